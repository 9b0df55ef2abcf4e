"""Run every benchmark, one after the other, each in its own process (`make bench`).

Each module prints its tables and writes benchmarks/results/<name>.json; BENCHMARKS.md
records the figures with the command that made them. A module that is not there (a
benchmark added on another branch) is skipped with a note; one that fails does not stop
the others, and the run exits 1 at the end.

    python -m benchmarks.run_all                    (all of them, ~10-15 minutes on 2 cores)
    python -m benchmarks.run_all cli serving        (some of them)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Quick ones first, so a failure shows early.
# bench_image is left out: it needs root and `make containers` (run it alone, as BENCHMARKS.md says).
MODULES = ("cli", "plan", "deploy", "serving", "protocols", "load", "staging", "growth", "hash_cache", "quantize", "adapters")


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    summary, failed = [], False
    for name in names:
        module = f"benchmarks.bench_{name}"
        if importlib.util.find_spec(module) is None:
            print(f"\n=== {module}: not in this checkout, skipped", flush=True)
            summary.append((name, "skipped", 0.0))
            continue
        print(f"\n=== {module}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", module], cwd=root)
        seconds = time.perf_counter() - start
        failed |= code != 0
        summary.append((name, "ok" if code == 0 else f"failed (exit {code})", seconds))
    print("\n=== summary")
    for name, outcome, seconds in summary:
        print(f"{name:10s} {outcome:18s} {seconds:7.1f}s")
    print(f"{'total':10s} {'':18s} {sum(s for _, _, s in summary):7.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
