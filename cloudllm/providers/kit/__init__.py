"""What every provider needs and none should write again: waiting, undo, idempotent calls, rollouts, servers.

- waiting: one Backoff rule, wait_until(poll, what=, deadline=, reporter=) and one StillRunning;
- ledger: what this run created, undone on failure by one policy (undone_on_failure);
- idempotent: create_once and delete_unless_gone, for calls whose answer can be lost;
- rollout: the spec's rollout (kind, percent, bake time) read in one place, and its option (RolloutOptions);
- server: a model server process (start, wait healthy, stop its group).
"""

from cloudllm.providers.kit.idempotent import create_once, delete_unless_gone
from cloudllm.providers.kit.ledger import Created, Ledger, undone_on_failure, with_leftovers
from cloudllm.providers.kit.rollout import DEFAULT_BAKE_SECONDS, Rollout, RolloutOptions, rollout_of
from cloudllm.providers.kit.waiting import SYSTEM_CLOCK, Backoff, Clock, Pending, StillRunning, pause, wait_until

__all__ = [
    "SYSTEM_CLOCK", "Backoff", "Clock", "Created", "DEFAULT_BAKE_SECONDS", "Ledger", "Pending", "Rollout", "RolloutOptions",
    "StillRunning",
    "create_once", "delete_unless_gone", "pause", "rollout_of", "undone_on_failure", "wait_until", "with_leftovers",
]  # fmt: skip
