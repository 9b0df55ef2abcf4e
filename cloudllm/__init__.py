"""cloudllm: a Hugging Face model folder to a live, autoscaled endpoint in one command."""

__version__ = "0.1.0"

_API = ("deploy", "delete", "inspect", "invoke", "invoke_stream", "list_endpoints", "logs", "package", "plan", "serve", "status")
_API += ("chat", "chat_stream", "invoke_grpc")


def __getattr__(name: str):
    # The API loads on first use, so `import cloudllm` (and the CLI's --help) stays fast.
    if name in _API:
        from cloudllm import api

        return getattr(api, name)
    raise AttributeError(f"module 'cloudllm' has no attribute {name!r}")


__all__ = ["__version__", *_API]
