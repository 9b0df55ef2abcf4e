"""What cloudllm writes on Vertex AI resources: labels (ours, the run's, the lock, the digests) and deployed-model ids."""

from __future__ import annotations

import base64

MANAGED_BY = ("managed-by", "cloudllm")
NAME_LABEL = "cloudllm-name"
LOCK_LABEL = "cloudllm-lock"  # "<run token>-<unix time>" while a deploy updates the endpoint
LOCK_STALE_SECONDS = 4 * 3600  # longer than any deploy's deadline: a lock this old is a killed deploy's
RUN_LABEL = "cloudllm-run"  # one deploy run's random token: finds what a create whose answer was lost made
RUNTIME_LABEL = "cloudllm-runtime"
SYSTEM_LABELS = (MANAGED_BY[0], NAME_LABEL, RUN_LABEL)  # the endpoint labels that are ours, not the spec's tags


# plan.fingerprint key -> label key; values are base32 sha256 (52 chars, label-safe).
DIGEST_LABELS = {
    "weights_digest": "cloudllm-weights",
    "code_digest": "cloudllm-code",
    "deploy_digest": "cloudllm-deploy",
    "scaling_digest": "cloudllm-scaling",
    "adapters_digest": "cloudllm-adapters",  # only with adapters (None is left out)
    "tags_digest": "cloudllm-tags",
    "digest": "cloudllm-digest",
}
# Every label cloudllm itself writes: the rest of a resource's labels are the spec's tags.
MODEL_LABEL = "cloudllm-model"  # on the first model's versions: its --model name, as a label value
OWN_LABELS = frozenset({*SYSTEM_LABELS, LOCK_LABEL, RUNTIME_LABEL, MODEL_LABEL, *DIGEST_LABELS.values()})


def with_tags(labels, tags: dict[str, str]) -> dict[str, str]:
    """A resource's labels with the user's part replaced by `tags` (cloudllm's own kept)."""
    return {**{k: v for k, v in labels.items() if k in OWN_LABELS}, **tags}


def user_tags(labels) -> dict[str, str]:
    """The spec's tags among a resource's labels."""
    return {k: v for k, v in labels.items() if k not in OWN_LABELS}


def lock_time(label: str) -> float:
    stamp = label.rsplit("-", 1)[-1]
    return float(stamp) if stamp.isdigit() else 0.0


def deployed_model_id(name: str, digest: str) -> str:
    """A DeployedModel id (10 digits, what Vertex AI allows) derived from the endpoint name and plan digest."""
    import hashlib

    value = int.from_bytes(hashlib.sha256(f"{name}:{digest}".encode()).digest()[:8], "big")
    return str(value % (9 * 10**9) + 10**9)


def encode_digest(hex_digest: str) -> str:
    """A sha256 hex digest as a label value: lowercase base32 without padding (52 chars)."""
    return base64.b32encode(bytes.fromhex(hex_digest)).decode().rstrip("=").lower()


def decode_digest(label: str) -> str:
    raw = label.upper()
    return base64.b32decode(raw + "=" * (-len(raw) % 8)).hex()


def label_ok(value: str) -> bool:
    return len(value) <= 63 and all(ch.islower() or ch.isdigit() or ch in "-_" for ch in value)


def label_value(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name.lower())[:63]
