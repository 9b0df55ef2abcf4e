"""cloudllm_procs: a pid is signalled only while it provably runs what we started; the poll loop on a fake clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cloudllm_procs
from cloudllm_procs import MARKER_ENV, Backoff, Pending, alive, kill, poll_until, start, stop
from cloudllm.testing import eventually
from tests.providers.test_kit import FakeClock

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_marker_in_the_command_line_or_the_environment_proves_the_pid(processes, tmp_path: Path) -> None:
    by_argv = start([*SLEEPER, "argv-marker"], log_path=tmp_path / "a.log")
    by_env = start(SLEEPER, stdout=subprocess.DEVNULL, marker="env-marker")
    processes += [by_argv, by_env]
    assert alive(by_argv.pid, "argv-marker") and not alive(by_argv.pid, "env-marker")
    assert alive(by_env.pid, "env-marker") and not alive(by_env.pid, "argv-marker")
    assert not alive(by_env.pid, None) and not alive(1, "env-marker") and not alive(True, "env-marker")  # type: ignore[arg-type]


def test_a_process_is_ours_from_the_moment_start_returns(processes) -> None:
    """Popen returns once exec has begun, a few microseconds before the kernel fills in the new command
    line and environment. A stop in that window once found neither marker, sent no SIGTERM, and left
    the server running (a CI flake in the emulators' stop). Many fresh starts make the window likely."""
    for number in range(200):
        process = start(["sleep", "120"], stdout=subprocess.DEVNULL, marker=f"fresh-{number}")
        processes.append(process)
        assert alive(process.pid, f"fresh-{number}"), f"start #{number} was not recognised as ours"


def test_a_pid_now_running_something_else_is_never_signalled(processes) -> None:
    """A record whose pid the kernel gave to another process (here: one started without our marker)."""
    stranger = start(SLEEPER, stdout=subprocess.DEVNULL)
    processes.append(stranger)
    assert not kill(stranger.pid, "ours")
    stop(stranger.pid, "ours", grace=0)
    assert stranger.poll() is None


def test_stop_ends_the_whole_group_and_a_stopped_pid_is_not_ours_any_more(processes) -> None:
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    leader = start([sys.executable, "-c", child], stdout=subprocess.PIPE, marker="group")
    processes.append(leader)
    eventually(lambda: len(_group(leader.pid)) == 2, what="the child started")
    stop(leader.pid, "group", grace=5)
    eventually(lambda: not _group(leader.pid), what="the group gone")
    assert not alive(leader.pid, "group")  # reaped, or a zombie with no command line and no environment


def test_sigterm_ignored_means_sigkill_after_the_grace(processes) -> None:
    stubborn = start([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
                     stdout=subprocess.PIPE, marker="stubborn")  # fmt: skip
    processes.append(stubborn)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    stop(stubborn.pid, "stubborn", grace=0.2)
    assert stubborn.wait(timeout=30) == -9


def test_the_marker_goes_into_the_environment_only_when_asked(processes) -> None:
    plain = start([sys.executable, "-c", f"import os; print(os.environ.get({MARKER_ENV!r}))"], stdout=subprocess.PIPE)
    marked = start([sys.executable, "-c", f"import os; print(os.environ.get({MARKER_ENV!r}))"], stdout=subprocess.PIPE, marker="m")
    processes += [plain, marked]
    assert plain.communicate(timeout=30)[0] == b"None\n" and marked.communicate(timeout=30)[0] == b"m\n"


def test_poll_until_returns_the_result_or_the_last_pending_at_the_deadline() -> None:
    clock = FakeClock()
    answers = iter([Pending("a"), Pending("b"), "done"])
    seen: list[str] = []
    assert poll_until(lambda: next(answers), deadline=10, clock=clock, on_pending=lambda p: seen.append(p.status)) == "done"
    assert seen == ["a", "b"] and clock.sleeps == [0.1, 0.16000000000000003]
    clock = FakeClock()
    last = poll_until(lambda: Pending(f"{clock.now:.1f}"), deadline=2, backoff=Backoff(first=0.5, growth=2, floor=1, most=1), clock=clock)
    assert isinstance(last, Pending) and clock.now == 2 and clock.sleeps == [0.5, 1.0, 0.5]  # the last sleep ends at the deadline


def test_cloudllm_procs_imports_only_the_standard_library() -> None:
    package = Path(cloudllm_procs.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                top = name.split(".")[0]
                assert top == "cloudllm_procs" or top in sys.stdlib_module_names or top == "__future__", f"{path.name} imports {name}"


def _group(pgid: int) -> list[int]:
    """Live (not zombie) members of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members
