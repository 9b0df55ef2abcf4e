"""CLI start-up: `cloudllm --help` and `cloudllm invoke --help` against `python -c "import boto3"`.

Goal (issue 7): under 0.25 s wall, median of several runs, and no torch, transformers,
google.cloud.aiplatform or sagemaker imported. Run: python -m benchmarks.bench_cli
"""

from __future__ import annotations

import subprocess
import sys

from benchmarks.common import BIN, median_wall, run_quiet, save, table

RUNS = 15
HEAVY = ("torch", "transformers", "google.cloud.aiplatform", "sagemaker", "boto3")


def heavy_modules_imported(argv: list[str]) -> list[str]:
    probe = (
        "import sys, cloudllm.cli\n"
        f"try:\n    cloudllm.cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    marker = [line for line in out.splitlines() if line.startswith("HEAVY=")][-1]
    return [m for m in marker.removeprefix("HEAVY=").split(",") if m]


def main() -> dict:
    cloudllm = str(BIN / "cloudllm")
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import boto3"': [sys.executable, "-c", "import boto3"],
        "cloudllm --help": [cloudllm, "--help"],
        "cloudllm invoke --help": [cloudllm, "invoke", "--help"],
        "cloudllm deploy --help": [cloudllm, "deploy", "--help"],
    }
    for args in cases.values():  # warm the page cache
        run_quiet(args)
    medians = {name: median_wall(lambda a=args: run_quiet(a), RUNS) for name, args in cases.items()}
    boto3 = medians['python -c "import boto3"']
    rows = [(name, seconds, seconds / boto3) for name, seconds in medians.items()]
    heavy = {argv[0] if argv else "--help": heavy_modules_imported(argv) for argv in (["--help"], ["invoke", "--help"])}
    print(table(["command", f"median wall s ({RUNS} runs)", "x import boto3"], rows))
    print(f"heavy modules imported: {heavy}")
    result = {"runs": RUNS, "median_seconds": medians, "heavy_modules_imported": heavy, "goal_seconds": 0.25}
    save("cli", result)
    return result


if __name__ == "__main__":
    main()
