"""Keep credentials out of what cloudllm prints: --json output, error lines, spec options.

`redact(value)` walks dicts and lists: a value under a secret-looking key becomes "***",
and every string has credential shapes (AWS keys, HF tokens, private keys, passwords in
URLs, bearer tokens, `secret=...` pairs) masked wherever they appear.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Words that make a key name secret ("hf_token", "SecretAccessKey", "db-password"), and
# pairs ("api_key"). Whole words only: "max_new_tokens" and "kms_key" are not secrets.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials", "apikey", "auth", "authorization", "bearer"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("account", "key"), ("signing", "key")}
_WORD_SPLIT = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])")

_SHAPES = [
    # PEM private keys (a GCP service-account JSON carries one).
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL), MASK),
    # Hugging Face tokens.
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), MASK),
    # AWS access key ids.
    (re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{16}\b"), MASK),
    # AWS secret access keys: 40 base64 characters of mixed case (hex digests are lowercase).
    (
        re.compile(
            r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[0-9/+])"
            r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
        ),
        MASK,
    ),
    # Google OAuth access tokens.
    (re.compile(r"\bya29\.[A-Za-z0-9_\-.]{20,}"), MASK),
    # user:password@host in URLs.
    (re.compile(r"(?<=://)([^/\s:@]+):([^/\s@]+)@"), rf"\1:{MASK}@"),
    # Authorization: Bearer ...
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9_\-.=+/]{8,}"), rf"\1 {MASK}"),
    # secret-named pairs inside free text: "aws_secret_access_key=...", "HF_TOKEN: ...".
    (
        re.compile(
            r"(?i)\b([\w-]*(?:token(?!s|izer)|secret|password|passwd|api[_-]?key|access[_-]?key)[\w-]*)"
            r"(['\"]?\s*[=:]\s*)(['\"]?)[^\s'\",;)}\]]+"
        ),
        rf"\1\2\3{MASK}",
    ),
]


def redact_text(text: str) -> str:
    """Mask credential shapes anywhere in a string."""
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def is_secret_key(key: Any) -> bool:
    """True for key names that hold secrets: hf_token, SecretAccessKey, api-key, password, key."""
    if not isinstance(key, str):
        return False
    words = [w.lower() for w in _WORD_SPLIT.split(key.strip()) if w]
    if words == ["key"]:
        return True
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def redact(value: Any) -> Any:
    """A copy of value (dicts, lists, strings) with secrets masked; other types unchanged."""
    if isinstance(value, dict):
        return {k: (MASK if is_secret_key(k) and value[k] not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
