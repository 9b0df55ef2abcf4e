"""The handler's entry point in the Vertex AI container: copy AIP_STORAGE_URI into a fresh folder, then become code/serve.py.

LoRA adapters (CLOUDLLM_ADAPTER_URIS: gs://.../adapters/<digest>/ prefixes, space-separated) are
copied to adapters/<digest>/ in that folder, where the server's settings.adapters name them.

Vertex runs it as `python3 -c <this source>` in the HF PyTorch inference DLC, which has python3 and
google-cloud-storage but not cloudllm: it imports nothing else, and cloudllm never imports it.
"""

import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor


def copy_prefix(client, uri: str, dest: str) -> int:
    """Every object under gs:// prefix `uri` into folder `dest`; the number copied."""
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    blobs = [b for b in client.list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")]

    def fetch(blob) -> None:
        path = os.path.abspath(os.path.join(dest, blob.name[len(prefix) :]))
        if not path.startswith(dest + os.sep):
            return  # an object name with ".." must not write outside the artifact folder
        os.makedirs(os.path.dirname(path), exist_ok=True)
        blob.download_to_filename(path)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fetch, blobs))
    return len(blobs)


def main() -> None:
    from google.cloud import storage

    dest = tempfile.mkdtemp(prefix="cloudllm-artifact-")
    client = storage.Client()
    count = copy_prefix(client, os.environ["AIP_STORAGE_URI"], dest)
    print(f"cloudllm: copied {count} files from {os.environ['AIP_STORAGE_URI']} to {dest}", flush=True)
    for uri in os.environ.get("CLOUDLLM_ADAPTER_URIS", "").split():
        folder = os.path.join(dest, "adapters", uri.rstrip("/").rsplit("/", 1)[-1])
        os.makedirs(folder, exist_ok=True)
        print(f"cloudllm: copied adapter {uri} ({copy_prefix(client, uri, folder)} files)", flush=True)
    os.chdir(dest)
    host = os.environ.get("CLOUDLLM_SERVE_HOST", "0.0.0.0")
    port = os.environ.get("AIP_HTTP_PORT", "8080")
    argv = [sys.executable, os.path.join(dest, "code", "serve.py"), "serve", "--host", host, "--port", port]
    if os.environ.get("CLOUDLLM_GRPC_PORT"):  # the model's grpcPorts: Vertex AI forwards directRawPredict there
        argv += ["--grpc-port", os.environ["CLOUDLLM_GRPC_PORT"]]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
