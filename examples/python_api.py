"""cloudllm from Python: the CLI's verbs as functions, results as objects.

    python examples/python_api.py ./models/tiny-gpt2
    (build that model offline with: python -m cloudllm.testing.tiny_models gpt2 ./models/tiny-gpt2)

Runs on this machine with the local provider; pass provider="sagemaker" or "vertex" (with
bucket, role/project...) to deploy the same way to a cloud. User mistakes raise
cloudllm.errors.UserError, whose .line() is the one-line message the CLI prints.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cloudllm
from cloudllm import api
from cloudllm.errors import UserError


def main(model: str) -> int:
    # What would happen, creating nothing (`cloudllm plan`).
    plan = cloudllm.plan(model, provider="local", name="py-demo", serving={"max_new_tokens": 32})
    print(plan.headline())

    # Create or update the endpoint (`cloudllm deploy`); a second call with the same inputs does nothing.
    result = cloudllm.deploy(model, provider="local", name="py-demo", serving={"max_new_tokens": 32})
    print(f"{result.action}: {result.endpoint.state} at {result.endpoint.url}")
    print("again:", cloudllm.deploy(model, provider="local", name="py-demo", serving={"max_new_tokens": 32}).action)

    # Call it (`cloudllm invoke`), whole or streamed.
    answer = cloudllm.invoke("py-demo", "Once upon a time", parameters={"max_new_tokens": 12})
    print("answer:", answer)  # the generated text (random words: the tiny model has random weights)
    response = cloudllm.invoke("py-demo", "Once upon a time", parameters={"max_new_tokens": 12}, full_response=True)
    print("response:", response)  # the endpoint's JSON, as it answered
    print("stream:", "".join(cloudllm.invoke_stream("py-demo", "Once upon a time", parameters={"max_new_tokens": 12})))

    # A whole cloudllm.yaml (`cloudllm apply`): plan everything, then create, update or leave each.
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "cloudllm.yaml"
        config.write_text(f"endpoints:\n  - name: py-demo\n    model: {Path(model).resolve()}\n    serving: {{max_new_tokens: 32}}\n")
        applied = api.apply(config, dry_run=True)
        for item in applied.endpoints:
            print(f"apply would {item.action} {item.name}: {'; '.join(item.reasons)}")
        print("apply outcome:", applied.outcome, applied.summary())

    # Mistakes are UserErrors with the fix, never tracebacks at the CLI.
    try:
        cloudllm.deploy(model, provider="local", name="bad_name")
    except UserError as exc:
        print("refused:", exc.line())

    cloudllm.delete("py-demo")
    print("deleted py-demo")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MODEL_FOLDER")
    sys.exit(main(sys.argv[1]))
