"""Click commands that live beside cloudllm/cli.py; each module's register(group) adds its commands."""
