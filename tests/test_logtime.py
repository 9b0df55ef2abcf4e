"""`cloudllm logs --since`: durations and times, and the time of a model server log line."""

from __future__ import annotations

import json

import pytest

from cloudllm.errors import UserError
from cloudllm.logtime import line_time, parse_since

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("value", "ago"), [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5h", 5400), (" 5m ", 300)])
def test_durations_count_back_from_now(value: str, ago: float) -> None:
    assert parse_since(value, now=NOW) == NOW - ago


def test_iso_times_are_utc_unless_they_say_otherwise() -> None:
    from datetime import datetime, timezone

    utc = datetime(2027, 1, 15, 8, 0, tzinfo=timezone.utc).timestamp()
    assert parse_since("2027-01-15T08:00:00") == utc
    assert parse_since("2027-01-15T08:00:00Z") == utc
    assert parse_since("2027-01-15T10:00:00+02:00") == utc
    assert parse_since("2027-01-15") == datetime(2027, 1, 15, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("value", ["yesterday", "10", "-5m", "10 minutes", "", "2027-13-45"])
def test_anything_else_is_one_clear_error(value: str) -> None:
    with pytest.raises(UserError, match="--since") as err:
        parse_since(value, now=NOW)
    assert "30s, 10m, 2h, 1d" in err.value.fix


def test_line_time_reads_the_servers_ts_field_only() -> None:
    line = json.dumps({"ts": "2027-01-15T08:00:00.250Z", "event": "request"})
    assert line_time(line) == parse_since("2027-01-15T08:00:00") + 0.25
    for other in ("INFO: uvicorn started", "{not json", json.dumps({"event": "x"}), json.dumps([1]), ""):
        assert line_time(other) is None
