"""How an update moves the traffic: read once from the spec, for every provider."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from cloudllm.errors import UserError
from cloudllm.providers.options import StrictOptions

if TYPE_CHECKING:
    from cloudllm.spec import DeploySpec

DEFAULT_BAKE_SECONDS = 300  # how long a canary (or each linear step) runs before more traffic moves
MAX_BAKE_SECONDS = 3600


@dataclass(frozen=True)
class Rollout:
    kind: str  # all-at-once, canary or linear
    percent: int  # the canary's share, or each linear step's; 100 for all-at-once
    bake_s: int  # --option rollout_wait, or the default for a gradual rollout

    @property
    def gradual(self) -> bool:
        return self.kind != "all-at-once"

    def __str__(self) -> str:
        return f"{self.kind}:{self.percent}, baking {self.bake_s}s before more traffic moves" if self.gradual else self.kind


def bake_seconds(value: object) -> int | None:
    """--option rollout_wait as seconds (None when not given); UserError when it is no number in range."""
    if value is None:
        return None
    if not str(value).isdigit() or int(str(value)) > MAX_BAKE_SECONDS:
        raise UserError(
            f"--option rollout_wait={value} is not a number of seconds in 0..{MAX_BAKE_SECONDS}", "pass e.g. --option rollout_wait=300"
        )
    return int(str(value))


def rollout_of(spec: "DeploySpec", rollout_wait: object = None, *, watched: bool = False) -> Rollout:
    """The spec's rollout. A gradual one (or one watched by alarms) bakes DEFAULT_BAKE_SECONDS unless told otherwise."""
    kind, _, pct = spec.rollout.partition(":")
    given = bake_seconds(rollout_wait)
    default = DEFAULT_BAKE_SECONDS if kind != "all-at-once" or watched else 0
    return Rollout(kind, int(pct) if pct else 100, default if given is None else given)


class RolloutOptions(StrictOptions):
    """The option of every provider that shifts traffic gradually."""

    rollout_wait: int | None = Field(
        None, description=f"Seconds a canary (or each linear step) bakes before more traffic moves, 0..{MAX_BAKE_SECONDS} (default {DEFAULT_BAKE_SECONDS})."
    )

    @field_validator("rollout_wait", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> int | None:
        return bake_seconds(value)  # its UserError is the one line a bad value gets
