"""One file to Cloud Storage as a single streamed resumable upload: the memory held is one block, not a chunk.

google-cloud-storage sends a resumable upload in chunks that it reads whole into memory (100 MiB by
default), and keeps the previous chunk alive (the last response's request body) while it reads the
next: 8 workers held ~1.5 GB at 4 GB of weights. GCS itself recommends sending a resumable upload in
one request where possible (chunking costs a round trip and a commit per chunk). So each file goes as
one PUT of its whole remainder to the session URI, streamed from the HashingReader in STREAM_BLOCK
blocks with a known Content-Length. When the request fails, GCS is asked how many bytes it kept
(`Content-Range: bytes */SIZE`) and the rest is sent from there: the bytes before it are not read again
unless the server lost them, and re-read bytes are not hashed twice (HashingReader).

The request cannot carry the crc32c up front (it is computed while sending), so the caller compares the
object's crc32c with the reader's afterwards and deletes an object that arrived corrupted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cloudllm.errors import DeployFailed

if TYPE_CHECKING:
    from cloudllm.storage import HashingReader

STREAM_BLOCK = 1024 * 1024  # what one read hands the socket: few Python calls per GB, little memory per worker
RETRIED_STATUS = {308, 408, 429, 500, 502, 503, 504}  # 308: the server kept part; the rest is retryable
_CONNECT_SECONDS, _ANSWER_SECONDS = 60, 600  # the answer to the last byte waits on GCS committing the object


class _Remainder:
    """The reader's bytes from where it stands to its end, as requests sends a body: blocks and a known length.

    An iterable with a length (not a file object) makes requests set Content-Length and urllib3 send each
    block as it comes, instead of chunked encoding or urllib3's 16 KiB reads.
    """

    def __init__(self, reader: "HashingReader", length: int):
        self.reader, self.length = reader, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        left = self.length
        while left > 0:
            block = self.reader.read(min(STREAM_BLOCK, left))
            if not block:
                raise DeployFailed("a file being uploaded got shorter while it was read", "do not change the model folder during a deploy")
            left -= len(block)
            yield block


def upload_streamed(blob, reader: "HashingReader", size: int, deadline_seconds: float, *, content_type: str) -> dict:
    """Upload reader's `size` bytes as blob (its metadata and KMS key included); returns the object's resource.

    Retries (sending only what GCS has not kept) until deadline_seconds have passed without success.
    """
    import requests
    from google.api_core import exceptions

    session_uri = blob.create_resumable_upload_session(content_type=content_type, size=size, checksum=None)
    http = blob.client._http  # the client's own authorized session (proxies, mTLS) that made the session
    give_up = time.monotonic() + deadline_seconds
    offset, pause = 0, 1.0
    while True:
        response = None
        try:
            reader.seek(offset)
            last = f"{offset}-{size - 1}" if size > offset else "*"
            response = http.put(
                session_uri,
                data=_Remainder(reader, size - offset) if size > offset else b"",
                headers={"Content-Range": f"bytes {last}/{size}", "Content-Type": content_type},
                timeout=(_CONNECT_SECONDS, _ANSWER_SECONDS),
            )
        except (requests.ConnectionError, requests.Timeout):
            pass
        if response is not None and response.status_code in (200, 201):
            return response.json()
        if response is not None and response.status_code not in RETRIED_STATUS:
            raise exceptions.from_http_response(response)
        kept = None
        while kept is None:  # until GCS says what it holds: sending from a guessed offset could corrupt
            if time.monotonic() > give_up:
                if response is not None:
                    raise exceptions.from_http_response(response)
                raise requests.ConnectionError(f"cannot reach the upload session of {blob.name}")  # GcsArtifacts._reachable reports it
            time.sleep(pause)
            pause = min(pause * 2, 30.0)
            kept = _bytes_kept(http, session_uri, size)
        if isinstance(kept, dict):  # the last byte had arrived after all: the object exists
            return kept
        offset = kept


def _bytes_kept(http, session_uri: str, size: int) -> dict | int | None:
    """How many leading bytes the session holds (a status query), the object's resource when it is complete,
    or None when the query got no answer."""
    import requests

    try:
        answer = http.put(session_uri, data=b"", headers={"Content-Range": f"bytes */{size}"}, timeout=(_CONNECT_SECONDS, _ANSWER_SECONDS))
    except (requests.ConnectionError, requests.Timeout):
        return None
    if answer.status_code in (200, 201):
        return answer.json()
    if answer.status_code != 308:
        return None
    kept = answer.headers.get("Range", "")  # "bytes=0-LAST", absent when none arrived
    return int(kept.rsplit("-", 1)[1]) + 1 if "-" in kept else 0
