"""`python -m cloudllm_runtime [serve] [--port ...]`: the same entrypoint as code/serve.py."""

from cloudllm_runtime.server import main

if __name__ == "__main__":
    main()
