"""What the storage emulators were asked, recorded on the server side (the emulators run in this process).

    with s3_requests() as log: ...deploy...      log: [(method, path, copy_source or "")]
    with gcs_requests() as log: ...deploy...     log: [(method, path)]

Recorded where the request arrives (moto's WSGI dispatcher, gcp-storage-emulator's router),
so a client-side shortcut cannot hide a copy or an upload from the test.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator
from urllib.parse import unquote

import pytest


@contextmanager
def s3_requests() -> Iterator[list[tuple[str, str, str]]]:
    from cloudllm_emulators.sagemaker import _Dispatcher

    log: list[tuple[str, str, str]] = []
    original = _Dispatcher.__call__

    def recording(self, environ, start_response):
        log.append((environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", "")), environ.get("HTTP_X_AMZ_COPY_SOURCE", "")))
        return original(self, environ, start_response)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Dispatcher, "__call__", recording)
        yield log


@contextmanager
def gcs_requests() -> Iterator[list[tuple[str, str]]]:
    from gcp_storage_emulator.server import Router

    log: list[tuple[str, str]] = []
    original = Router.handle

    def recording(self, method):
        log.append((method, unquote(self._request_handler.path)))
        return original(self, method)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Router, "handle", recording)
        yield log


def s3_writes(log: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Object PUTs, multipart parts and server-side copies (PUT with x-amz-copy-source), multipart POSTs."""
    return [r for r in log if r[0] in ("PUT", "POST") and r[1].count("/") > 1]


def gcs_writes(log: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Uploads (the object's name is in the query or the body, not the path) and copies (rewriteTo, copyTo)."""
    return [r for r in log if r[1].startswith("/upload/") or "/rewriteTo/" in r[1] or "/copyTo/" in r[1]]
