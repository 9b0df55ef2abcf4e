"""How long one cloud call keeps retrying transient faults before it fails.

botocore counts attempts (its standard mode); the Google clients count seconds, and this is
their budget: $CLOUDLLM_RETRY_SECONDS, else two minutes (google-cloud-storage's own default).
"""

from __future__ import annotations

import os

from cloudllm.errors import UserError

RETRY_SECONDS_ENV = "CLOUDLLM_RETRY_SECONDS"
RETRY_SECONDS_DEFAULT = 120.0


def retry_seconds() -> float:
    raw = os.environ.get(RETRY_SECONDS_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else RETRY_SECONDS_DEFAULT
    except ValueError:
        raise UserError(f"{RETRY_SECONDS_ENV}={raw!r} is not a number of seconds", f"set it like {RETRY_SECONDS_ENV}=60") from None
