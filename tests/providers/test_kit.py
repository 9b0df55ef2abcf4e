"""The provider kit on a fake clock: no test here sleeps."""

from __future__ import annotations

import pytest

from cloudllm.console import Reporter
from cloudllm.errors import DeployFailed, UserError
from cloudllm.providers.kit import (
    Backoff,
    Ledger,
    Pending,
    StillRunning,
    create_once,
    delete_unless_gone,
    rollout_of,
    undone_on_failure,
    wait_until,
)
from cloudllm.spec import DeploySpec


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Steps(Reporter):
    def __init__(self):
        self.steps: list[str] = []
        self.updates: list[str] = []

    def step(self, message: str) -> None:
        self.steps.append(message)


def test_backoff_starts_short_and_never_sleeps_more_than_a_tenth_of_the_wait():
    clock = FakeClock()
    delays = Backoff().delays(clock)
    seen = []
    for _ in range(60):
        delay = next(delays)
        seen.append(delay)
        clock.sleep(delay)
    assert seen[0] == 0.1
    assert seen == sorted(seen)
    assert max(seen) == 15.0
    waited = 0.0
    for delay in seen:
        assert delay <= max(0.5, waited / 10) + 1e-9 or delay == 0.1
        waited += delay


def test_wait_until_returns_the_first_answer_that_is_not_pending():
    clock = FakeClock()
    answers = iter([Pending("Creating"), Pending("Creating"), {"status": "InService"}])
    assert wait_until(lambda: next(answers), what="x", deadline=60, clock=clock) == {"status": "InService"}
    assert len(clock.sleeps) == 2


def test_wait_until_raises_still_running_with_the_late_line_at_the_deadline():
    clock = FakeClock()
    with pytest.raises(StillRunning) as info:
        wait_until(
            lambda: Pending("Updating"), what="x", deadline=30, clock=clock, late=lambda p: (f"x is still {p.status}", "wait more")
        )
    assert info.value.problem == "x is still Updating" and info.value.fix == "wait more"
    assert clock.now == pytest.approx(30)  # the last sleep stops at the deadline, not past it
    assert isinstance(info.value, DeployFailed)


def test_wait_until_lets_the_poll_fail_it():
    def poll():
        raise DeployFailed("it failed", "fix it")

    with pytest.raises(DeployFailed, match="it failed"):
        wait_until(poll, what="x", deadline=30, clock=FakeClock())


def test_ledger_undoes_newest_first_and_names_leftovers_in_the_fix():
    ledger, reporter, undone = Ledger(), Steps(), []

    def broken():
        raise RuntimeError("AccessDenied")

    with pytest.raises(DeployFailed) as info:
        with undone_on_failure(ledger, reporter):
            ledger.add("artifacts", "s3://b/x", lambda: undone.append("artifacts"))
            ledger.add("model", "m", broken)
            ledger.add("endpoint", "e", lambda: undone.append("endpoint"))
            raise DeployFailed("the endpoint failed", "see its log")
    assert undone == ["endpoint", "artifacts"]
    assert reporter.steps == ["cleaned up endpoint e", "cleaned up artifacts s3://b/x"]
    assert info.value.fix == "see its log; not cleaned up: model m (AccessDenied)"


def test_still_running_undoes_nothing_and_gets_the_providers_advice():
    ledger, undone = Ledger(), []
    with pytest.raises(StillRunning) as info:
        with undone_on_failure(ledger, Steps(), still_running_fix=lambda: "deploy again later"):
            ledger.add("endpoint", "e", lambda: undone.append("e"))
            raise StillRunning("deploying did not finish within 5s", "")
    assert undone == [] and info.value.fix == "deploy again later"


@pytest.mark.parametrize("keep", [True, False])
def test_ctrl_c_undoes_unless_the_provider_resumes(keep):
    ledger, undone = Ledger(), []
    with pytest.raises(KeyboardInterrupt):
        with undone_on_failure(ledger, Steps(), keep_on_interrupt=keep):
            ledger.add("endpoint", "e", lambda: undone.append("e"))
            raise KeyboardInterrupt
    assert undone == ([] if keep else ["e"])


def test_ledger_keeps_what_the_provider_says_is_in_use():
    ledger, reporter, undone = Ledger(), Steps(), []
    ledger.add("model", "m", lambda: undone.append("m"))
    ledger.add("endpoint-config", "c", lambda: undone.append("c"))
    ledger.undo(reporter, keep=lambda entry: "endpoint e uses it" if entry.name == "c" else None)
    assert undone == ["m"] and reporter.steps == ["kept endpoint-config c: endpoint e uses it", "cleaned up model m"]


class Exists(Exception):
    pass


def test_create_once_takes_what_an_earlier_attempt_made():
    sent = []

    def send():
        sent.append(1)
        raise Exists()

    assert create_once(send, find=lambda: "ours", exists=lambda e: isinstance(e, Exists)) == "ours"
    with pytest.raises(Exists):  # taken by someone else: the cloud's own error
        create_once(send, find=lambda: None, exists=lambda e: isinstance(e, Exists))


def test_create_once_looks_before_sending_again():
    sent = []

    def retry(attempt):
        def twice():
            try:
                return attempt()
            except ConnectionError:
                return attempt()

        return twice

    def send():
        sent.append(1)
        raise ConnectionError("answer lost")

    assert create_once(send, find=lambda: "made by the first attempt", retry=retry) == "made by the first attempt"
    assert len(sent) == 1


def test_delete_unless_gone():
    def gone():
        raise KeyError("not found")

    assert delete_unless_gone(gone, gone=lambda e: isinstance(e, KeyError)) is None
    assert delete_unless_gone(lambda: "op", gone=lambda e: True) == "op"
    with pytest.raises(KeyError):
        delete_unless_gone(gone, gone=lambda e: False)


def test_rollout_parsed_in_one_place():
    spec = DeploySpec(model="m", name="x", rollout="canary:10")
    assert (rollout_of(spec).kind, rollout_of(spec).percent, rollout_of(spec).bake_s) == ("canary", 10, 300)
    assert rollout_of(spec, "0").bake_s == 0
    assert rollout_of(DeploySpec(model="m", name="x")).bake_s == 0
    assert rollout_of(DeploySpec(model="m", name="x"), watched=True).bake_s == 300
    with pytest.raises(UserError, match="rollout_wait=soon"):
        rollout_of(spec, "soon")


def test_pause_waits_its_time_in_steps_of_five_seconds():
    from cloudllm.providers.kit import pause

    clock = FakeClock()
    pause(12, what="baking", clock=clock)
    assert clock.now == pytest.approx(12) and clock.sleeps == [5.0, 5.0, 2.0]
