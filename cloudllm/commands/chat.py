"""`cloudllm chat NAME`: a conversation with an endpoint in the terminal, streamed."""

from __future__ import annotations

import sys

import click

from cloudllm.commands.flags import target_flags
from cloudllm.commands.streaming import pieces_interruptibly


@click.command("chat")
@click.argument("name")
@click.option("--system", help="A system message that opens the conversation.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Reply length per turn.")
@click.option("--no-stream", is_flag=True, help="Print each reply whole instead of token by token.")
@click.option("--provider", help="Provider of an endpoint deployed from another machine.")
@click.option("--region", help="Region of the endpoint (default: the record's).")
@click.option("--profile", help="AWS profile (SageMaker).")
@click.option("--project", help="Google Cloud project (Vertex AI).")
@target_flags
def chat(name: str, system: str | None, max_new_tokens: int | None, no_stream: bool, provider: str | None,
         region: str | None, profile: str | None, project: str | None, target: dict) -> None:  # fmt: skip
    """Talk to endpoint NAME: each line you type is a turn; the history stays for the session.

    Ctrl-C during a reply ends that reply (what came so far stays in the history) and asks for the
    next turn; Ctrl-C at the prompt ends the chat with exit code 130, Ctrl-D or /exit with 0.
    /reset forgets the history.

    \b
    Examples:
      cloudllm chat demo
      cloudllm chat demo --system "Answer in one sentence."
      cloudllm chat shared --adapter legal
    """
    from cloudllm import api
    from cloudllm.invocation import openai_choice_text

    where = {"provider": provider, "region": region,
             "options": {k: v for k, v in (("profile", profile), ("project", project)) if v} or None}  # fmt: skip
    parameters = {"max_new_tokens": max_new_tokens} if max_new_tokens else None
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = _read_turn() if interactive else input("")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:  # the shell's convention for a program ended by SIGINT, without a traceback
            click.echo()
            sys.exit(130)
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            if no_stream:
                reply = openai_choice_text(api.chat(name, history, parameters=parameters, **target, **where)["choices"][0]) or ""
                click.echo(reply, nl=False)
            else:
                for piece in pieces_interruptibly(api.chat_stream(name, history, parameters=parameters, **target, **where)):
                    reply += piece
                    click.echo(piece, nl=False)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo(" [interrupted]", nl=False)
        except Exception:
            history.pop()  # the turn failed: it does not stay in the history
            raise
        click.echo()
        history.append({"role": "assistant", "content": reply})


def _read_turn() -> str:
    """The next line typed at the terminal, after the prompt; Ctrl-C while waiting raises KeyboardInterrupt.

    input() prints the prompt and then blocks in read(2) with no look at pending signals in between:
    a SIGINT landing in that gap (a loaded machine, or a quick Ctrl-C right after a reply) only set a
    flag, and the chat hung until a line came. Waiting in short select()s returns to Python often
    enough that a pending Ctrl-C is always handled; the terminal's canonical mode hands read(2) one
    whole line at a time, so no line is ever split or held back in a buffer.
    """
    import os
    import select

    click.echo("> ", nl=False)
    sys.stdout.flush()
    fd = sys.stdin.fileno()
    while not select.select([fd], [], [], 0.2)[0]:
        pass
    data = os.read(fd, 65536)
    if not data:
        raise EOFError
    return data.decode(sys.stdin.encoding or "utf-8", errors="replace").rstrip("\n")
