"""ServingSettings.intra_op_threads: validated at load, applied by the engine, reported by /info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import httpx
import pytest

from cloudllm_runtime.server import StartupError, load_settings
from cloudllm_runtime.settings import ServingSettings, cgroup_cpu_limit, usable_cpus

from .conftest import ServerProcess

SMALL = dict(task="text-generation", max_input_tokens=64, max_total_tokens=128, max_new_tokens=8)


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [
        ("max 100000", None),  # no quota
        ("max 100000\n", None),
        ("150000 100000", 2),  # 1.5 CPUs round up
        ("50000 100000", 1),  # half a CPU is still one thread
        ("200000 100000\n", 2),
        ("1000 100000", 1),
        ("", None),
        ("garbage", None),
        ("abc 100000", None),
        ("100000 0", None),
    ],
)
def test_cgroup_cpu_limit(cpu_max: str, cpus: int | None) -> None:
    assert cgroup_cpu_limit(cpu_max) == cpus


def test_usable_cpus_is_capped_by_the_quota_file(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")
    assert usable_cpus(str(quota)) == 1
    quota.write_text("max 100000\n")
    assert usable_cpus(str(quota)) == usable_cpus(str(tmp_path / "absent")) >= 1


def test_old_settings_keep_their_bytes() -> None:
    """Unset, the field is left out of settings.json: settings written before it keep their digest."""
    assert "intra_op_threads" not in ServingSettings(task="text-generation").to_json()
    assert json.loads(ServingSettings(task="text-generation", intra_op_threads=3).to_json())["intra_op_threads"] == 3


@pytest.mark.parametrize("bad", [0, -2, "2", 1.5, True])
def test_bad_intra_op_threads_is_refused_at_load(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**SMALL, "intra_op_threads": bad}))
    with pytest.raises(StartupError) as caught:
        load_settings(str(tmp_path), str(path))
    message = str(caught.value)
    assert "\n" not in message and "intra_op_threads must be a whole number of threads, at least 1" in message
    assert repr(bad) in message


def _info(tiny_gpt2: Path, artifact_factory: Callable[..., Path], **settings: object) -> dict:
    server = ServerProcess(artifact_factory(tiny_gpt2, **SMALL, **settings))
    try:
        server.wait_ready()
        return httpx.get(server.url + "/info", timeout=30).json()
    finally:
        assert server.stop() == 0


def test_server_applies_the_setting(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> None:
    assert _info(tiny_gpt2, artifact_factory, intra_op_threads=1)["intra_op_threads"] == 1


def test_server_defaults_to_the_cpus_it_may_use(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> None:
    # The server inherits this process's affinity and cgroup, so it computes the same count.
    assert _info(tiny_gpt2, artifact_factory)["intra_op_threads"] == usable_cpus()


def test_server_with_a_bad_value_exits_with_one_line(tiny_gpt2: Path, artifact_factory: Callable[..., Path]) -> None:
    artifact = artifact_factory(tiny_gpt2, **SMALL)
    settings_file = artifact / "code" / "settings.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "intra_op_threads": 0}))
    server = ServerProcess(artifact)
    code = server.process.wait(120)
    log = server.log()
    server.stop()
    assert code == 2, log
    assert "intra_op_threads must be a whole number of threads, at least 1 (got 0)" in log
    assert "Traceback" not in log
