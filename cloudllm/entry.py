"""The `cloudllm` console script: a plain local invoke answered before click and cloudllm.cli load.

`cloudllm invoke NAME PROMPT` to a local endpoint was 4.4x curl (BENCHMARKS.md, issue 15), the
rest being click (~16 ms) and cloudllm.cli (~47 ms) imported before cloudllm/quick_invoke.py ran.
Here argv is read by hand; only `invoke NAME PROMPT` with --max-new-tokens N and --timeout S (each
at most once, in forms click reads the same) is answered here, and only when quick_invoke answers
it. Anything else, including every error that happens before the request is sent, goes to
cloudllm.cli.main with the same argv, which parses and reports it as always. Output and exit codes
are the full CLI's: what cli.invoke prints, and cli.main's line for an error of the answer.
"""

from __future__ import annotations

import sys

_TOKENS_FLAG = "--max-new-tokens"
_TIMEOUT_FLAG = "--timeout"


def main(argv: list[str] | None = None) -> int | None:
    """Console entry point; the exit code is returned, or cloudllm.cli.main exits itself."""
    args = sys.argv[1:] if argv is None else list(argv)
    plain = _plain_invoke(args)
    if plain is not None:
        from cloudllm.interrupts import sigterm_interrupts

        sigterm_interrupts()
        try:
            code = _quick_invoke(*plain)
        except KeyboardInterrupt:
            _stderr("interrupted: run the same command again to resume, or `cloudllm delete NAME` to clean up")
            return 130
        except BrokenPipeError:
            return 0
        if code is not None:
            return code
    from cloudllm.cli import main as full_main

    full_main(argv)
    return 0


def _plain_invoke(args: list[str]) -> tuple[str, str, int | None, float | None] | None:
    """(name, prompt, max_new_tokens, timeout) when args is a plain invoke this module answers, else None."""
    if len(args) < 3 or args[0] != "invoke":
        return None
    positional: list[str] = []
    values: dict[str, str] = {}
    rest = iter(args[1:])
    for arg in rest:
        flag, eq, value = arg.partition("=")
        if flag in (_TOKENS_FLAG, _TIMEOUT_FLAG):
            if not eq:
                value = next(rest, None)
                if value is None:
                    return None
            if flag in values:
                return None  # given twice: click's rule (the last wins) is the full path's to apply
            values[flag] = value
        elif arg.startswith("-"):
            return None  # another flag, `--`, or a name/prompt click would read as a flag
        else:
            positional.append(arg)
    if len(positional) != 2:
        return None
    tokens = values.get(_TOKENS_FLAG)
    timeout = values.get(_TIMEOUT_FLAG)
    # Only plain decimals: anything click might read differently (+5, 1_0, nan, 1e3) is its to judge.
    if tokens is not None and not (tokens.isascii() and tokens.isdigit()):
        return None
    if timeout is not None:
        if not (timeout.isascii() and timeout.replace(".", "", 1).isdigit()):
            return None
        if not 0.1 <= float(timeout) <= 3600:
            return None  # out of --timeout's range: the full path's error line
    return positional[0], positional[1], None if tokens is None else int(tokens), None if timeout is None else float(timeout)


def _quick_invoke(name: str, prompt: str, max_new_tokens: int | None, timeout: float | None) -> int | None:
    """Print the endpoint's answer as cli.invoke does and return 0, or None when quick_invoke does not answer."""
    from cloudllm.errors import UserError
    from cloudllm.invocation import build_body, response_text
    from cloudllm.quick_invoke import local_answer

    parameters = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else None
    try:
        result = local_answer(name, build_body(prompt, parameters), timeout, {"provider": None, "region": None, "options": None})
    except UserError as exc:  # the answer was an error: cli.main's line and exit code
        from cloudllm.redact import redact_text

        _stderr(f"error: {redact_text(exc.line())}")
        return exc.exit_code
    if result is None:
        return None
    text = response_text(result)
    if text is None:
        import json

        text = json.dumps(result, indent=2, ensure_ascii=False)
    _echo(sys.stdout, text)
    return 0


def _echo(stream, line: str) -> None:
    """click.echo(line): a line, flushed, with ANSI escapes stripped when the stream is not a terminal."""
    if not _isatty(stream):
        import re

        line = re.sub(r"\033\[[0-?]*[ -/]*[@-~]", "", line)  # click's _ansi_re
    stream.write(line + "\n")
    stream.flush()


def _stderr(line: str) -> None:
    _echo(sys.stderr, line)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except Exception:  # click's isatty: a stream that cannot say is not a terminal
        return False
