"""The model server's log: one JSON object per line on stderr, what the container platforms collect.

The bottom layer of the runtime (stdlib only): the app, the engine and the entrypoint all
write through log_event, and `cloudllm logs --json` parses every line back, so a line is
always valid UTF-8 JSON whatever a client put into a request.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def log_event(event: str, **fields: Any) -> None:
    """Write one line {"ts", "event", **fields}; a log line never fails the caller."""
    now = time.time()
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z", "event": event}
    record.update(fields)
    try:
        # A lone surrogate from a request has no UTF-8 form: it becomes "?" (only ever inside a string).
        line = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "replace").decode("utf-8")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (ValueError, OSError, UnicodeError, RecursionError):
        pass
