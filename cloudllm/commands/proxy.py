"""`cloudllm proxy NAME`: an OpenAI-compatible URL on this machine for an endpoint on any provider."""

from __future__ import annotations

import click


@click.command("proxy")
@click.argument("name")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port on 127.0.0.1 (0 picks a free one).")
@click.option("--provider", help="Provider of an endpoint deployed from another machine.")
@click.option("--region", help="Region of the endpoint (default: the record's).")
@click.option("--profile", help="AWS profile (SageMaker).")
@click.option("--project", help="Google Cloud project (Vertex AI).")
def proxy(name: str, port: int, provider: str | None, region: str | None, profile: str | None, project: str | None) -> None:
    """Serve OpenAI's /v1/chat/completions, /v1/completions and /v1/models for endpoint NAME on loopback.

    Each request is signed as the endpoint's platform needs (SigV4 for SageMaker, an ADC token for
    Vertex AI); streams go out as they arrive. Ctrl-C stops it.

    \b
    Examples:
      cloudllm proxy chat --port 8000
      OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=unused python my_app.py
    """
    from cloudllm import api
    from cloudllm.proxy import serve_proxy

    options = {k: v for k, v in (("profile", profile), ("project", project)) if v}
    holder = api._provider_for_name(name, provider, region, options or None)

    def ready(url: str) -> None:
        click.echo(f"OpenAI-compatible proxy for endpoint {name} ({holder.name}) at {url}", err=True)
        click.echo(f"OPENAI_BASE_URL={url}")

    serve_proxy(name, holder, port=port, ready=ready)
