"""The one error type for user mistakes, and the exit codes the CLI documents.

Anything raised that is not a ``UserError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

# Exit codes (documented in README.md; CI pipelines branch on them).
EXIT_OK = 0
EXIT_FAILED = 1  # the cloud or the model server said no, or a deploy failed on the way
EXIT_BAD_INPUT = 2  # flags, config files, model folders, request bodies
EXIT_PLAN_REFUSED = 3  # the plan says it will not work (e.g. does not fit the GPU)


class UserError(Exception):
    """A mistake the user can fix: printed as one line with the fix, never a traceback."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}. {self.fix}" if self.fix else f"{self.problem}."


class DeployFailed(UserError):
    """The platform refused or the endpoint failed to come up; what we created is cleaned up."""

    exit_code = EXIT_FAILED


class PlanRefused(UserError):
    """The plan shows the deploy cannot work (does not fit, unsupported feature)."""

    exit_code = EXIT_PLAN_REFUSED


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a change to an endpoint, with what to do next (the CLI prints it as one line)."""

    def __init__(self, advice: str):
        self.advice = advice
        super().__init__(advice)


def interrupted_advice(name: str) -> str:
    return f"run the same command again to resume, or `cloudllm delete {name}` to clean up"
