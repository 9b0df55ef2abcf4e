"""The hash cache with many small files: 1,000 / 3,000 / 10,000 files hashed from cold, one new
CLOUDLLM_HOME each. Linear means the seconds per 1,000 files stay flat (issue 14: 10,000 files
took 31 s when the whole cache file was rewritten per hashed file).  Run: python -m benchmarks.bench_hash_cache
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import save, scoped_env, table

COUNTS = (1_000, 3_000, 10_000)


def main() -> dict:
    import cloudllm.hashing as hashing

    base = Path(tempfile.mkdtemp(prefix="cloudllm-bench-hash-"))
    rows, results = [], {}
    try:
        files = base / "files"
        files.mkdir()
        for n in range(max(COUNTS)):
            (files / f"f{n:05d}.json").write_text(f'{{"n": {n}}}')
        paths = sorted(files.iterdir())
        for count in COUNTS:
            with scoped_env(CLOUDLLM_HOME=str(base / f"home-{count}")):
                hashing._cache = None
                start = time.perf_counter()
                for path in paths[:count]:
                    hashing.sha256_file(path)
                seconds = time.perf_counter() - start
                cache_bytes = os.path.getsize(base / f"home-{count}" / "cache" / "sha256.json")
            hashing._cache = None
            results[count] = {"seconds": seconds, "cache_bytes": cache_bytes}
            rows.append((count, seconds, seconds / count * 1000, cache_bytes))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(table(["files", "wall s", "s per 1,000 files", "cache file bytes"], rows))
    save("hash_cache", {"runs": results})
    return results


if __name__ == "__main__":
    main()
