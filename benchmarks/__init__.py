"""cloudllm's benchmarks: every figure is a ratio against a baseline run in the same script.

Run all with `make bench` (python -m benchmarks.run_all); each module also runs alone.
Results land in benchmarks/results/<name>.json; BENCHMARKS.md quotes them.
"""
