"""Progress in CI logs: one line per change of state, not one per poll."""

from __future__ import annotations

import pytest

from cloudllm.console import PlainReporter


def test_plain_waiting_prints_changes_of_state_only(capsys: pytest.CaptureFixture[str]) -> None:
    reporter = PlainReporter()
    with reporter.waiting("waiting for endpoint demo") as update:
        for status in ["Creating"] * 20 + ["InService"]:
            update(status)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "waiting for endpoint demo..."
    assert [line.split(" (")[0].strip() for line in lines[1:-1]] == ["Creating", "InService"]
    assert lines[-1].startswith("waiting for endpoint demo: done in ")


def test_plain_waiting_repeats_a_state_as_a_heartbeat(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PlainReporter, "HEARTBEAT_SECONDS", 0.0)
    with PlainReporter().waiting("deleting endpoint demo") as update:
        update("Deleting")
        update("Deleting")
    assert capsys.readouterr().err.count("Deleting (") == 2
