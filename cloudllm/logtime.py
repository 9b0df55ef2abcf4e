"""Times for `cloudllm logs --since`: the flag's value, and the time a model server log line was written."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

from cloudllm.errors import UserError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, *, now: float | None = None) -> float:
    """'10m', '2h', '1d', '30s' ago, or an ISO 8601 time (UTC unless it says otherwise) -> Unix time."""
    now = time.time() if now is None else now
    match = _DURATION.match(value)
    if match:
        return now - float(match.group(1)) * _SECONDS[match.group(2)]
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(
            f"--since {value!r} is neither a duration nor a time",
            "write it as 30s, 10m, 2h, 1d or a UTC time like 2026-01-31T12:00:00",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def line_time(line: str) -> float | None:
    """The Unix time of a model server log line (its JSON "ts" field), or None for other lines."""
    if not line.startswith("{"):
        return None
    try:
        stamp = json.loads(line).get("ts")
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError, TypeError):
        return None
