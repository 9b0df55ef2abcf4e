"""Several models on one local endpoint (--add-model): each its own server, picked with --model.

A real endpoint of a tiny GPT-2 gets a tiny BERT embedder beside it, through the real CLI in
subprocesses and the Python API, over real HTTP on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from cloudllm.testing import eventually
from cloudllm.testing.tiny_models import build_tiny_bert
from tests.conftest import assert_one_line_error, run_cli, shared_local_home

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLOUDLLM_HOME for the module; the added models' servers are killed at the end too."""
    homes = shared_local_home(tmp_path_factory)
    env = next(homes)
    yield env
    for state in Path(env["CLOUDLLM_HOME"]).glob("local/*/models/*/state.json"):
        try:
            os.killpg(json.loads(state.read_text()).get("pid"), signal.SIGKILL)
        except (ProcessLookupError, TypeError, ValueError):
            pass
    next(homes, None)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT without a head (feature-extraction): a model of another kind than the GPT-2."""
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "embedder", head="base")


@pytest.fixture(scope="module")
def broken_embedder(embedder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedder with a config.json whose sizes disagree with its weights: it passes inspect, then fails to load."""
    folder = tmp_path_factory.mktemp("broken") / "embedder"
    shutil.copytree(embedder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _invoke(home: dict, *args: str) -> object:
    result = run_cli("invoke", *args, "--json", env=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["response"]


def _status(home: dict, name: str) -> dict:
    result = run_cli("status", name, "--json", env=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie has none
    except OSError:
        return False


def _relay_pids(folder: Path) -> list[int]:
    return [json.loads(front.read_text())["pid"] for front in folder.rglob("front.json")]


@pytest.fixture(scope="module")
def shared(home: dict, tiny_gpt2: Path, embedder: Path) -> dict:
    """Endpoint `shared`: the tiny GPT-2, then the embedder added as model `embed`; what each answered alone."""
    first = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "shared", "--json", env=home)
    assert first.returncode == 0, first.stderr
    gpt2_alone = _invoke(home, "shared", PROMPT, "--max-new-tokens", "8")
    base_pid = _status(home, "shared")["details"]["pid"]
    added = run_cli("deploy", str(embedder), "--provider", "local", "--name", "shared", "--add-model", "embed", "--json", env=home)
    assert added.returncode == 0, added.stderr
    # The embedder's own answer: deployed alone, under a name of its own.
    solo = run_cli("deploy", str(embedder), "--provider", "local", "--name", "solo", "--json", env=home)
    assert solo.returncode == 0, solo.stderr
    embedder_alone = _invoke(home, "solo", PROMPT)
    assert run_cli("delete", "solo", env=home).returncode == 0
    return {"gpt2_alone": gpt2_alone, "embedder_alone": embedder_alone, "base_pid": base_pid, "added": json.loads(added.stdout)}


def test_each_model_answers_its_own_answer_through_the_cli(shared: dict, home: dict) -> None:
    gpt2, embedding = shared["gpt2_alone"], shared["embedder_alone"]
    assert gpt2 != embedding
    assert _invoke(home, "shared", PROMPT, "--model", "embed") == embedding
    assert _invoke(home, "shared", PROMPT, "--max-new-tokens", "8") == gpt2  # no --model: the first model
    assert _invoke(home, "shared", PROMPT, "--max-new-tokens", "8", "--model", "tiny-gpt2") == gpt2  # the first, by its name
    streamed = run_cli("invoke", "shared", PROMPT, "--max-new-tokens", "8", "--stream", "--model", "tiny-gpt2", env=home)
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") == gpt2[0]["generated_text"], streamed.stderr


def test_adding_a_model_leaves_the_first_server_alone(shared: dict, home: dict, tiny_gpt2: Path) -> None:
    status = _status(home, "shared")
    assert status["details"]["pid"] == shared["base_pid"] and _running(shared["base_pid"])
    assert status["state"] == "InService" and status["model"] == str(tiny_gpt2)
    embed = status["details"]["models"]["embed"]
    assert embed["state"] == "InService" and embed["url"].startswith("http://127.0.0.1:") and embed["pid"] != shared["base_pid"]
    # The text form lists each added model on a line of its own, not as a Python dict.
    text = run_cli("status", "shared", env=home).stdout
    assert "   models:\n" in text and f"embed: state=InService url={embed['url']} pid={embed['pid']}" in text and "'state'" not in text
    # The record still names the first model (the added one is not the endpoint's model).
    assert json.loads((Path(home["CLOUDLLM_HOME"]) / "endpoints" / "shared.json").read_text())["model"] == str(tiny_gpt2.resolve())


def test_the_python_api_picks_the_model(shared: dict, home: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudllm import api

    monkeypatch.setenv("CLOUDLLM_HOME", home["CLOUDLLM_HOME"])
    assert api.invoke("shared", PROMPT, model="embed", full_response=True) == shared["embedder_alone"]
    assert api.invoke("shared", PROMPT, parameters={"max_new_tokens": 8}, full_response=True) == shared["gpt2_alone"]


def test_deploying_the_same_added_model_again_changes_nothing(shared: dict, home: dict, embedder: Path) -> None:
    before = _status(home, "shared")["details"]["models"]["embed"]
    plan = run_cli("plan", str(embedder), "--provider", "local", "--name", "shared", "--add-model", "embed", "--json", env=home)
    assert plan.returncode == 0, plan.stderr
    diff = json.loads(plan.stdout)["diff"]
    assert diff["reasons"] == ["model embed beside the endpoint's first model"]
    assert [(c["action"], c["resource"], c["name"]) for c in diff["changes"]] == [("unchanged", "model", "shared/embed")]
    again = run_cli("deploy", str(embedder), "--provider", "local", "--name", "shared", "--add-model", "embed", env=home)
    assert again.returncode == 0, again.stderr
    assert "already serves this version" in again.stderr
    after = _status(home, "shared")["details"]["models"]["embed"]
    assert after["pid"] == before["pid"] and after["url"] == before["url"] and _running(after["pid"])


def test_a_model_the_endpoint_lacks_is_one_line_naming_its_models(shared: dict, home: dict) -> None:
    line = assert_one_line_error(run_cli("invoke", "shared", PROMPT, "--model", "nope", env=home), contains="no model 'nope'")
    assert "tiny-gpt2, embed" in line, line


def test_add_model_to_an_endpoint_that_does_not_exist_creates_nothing(home: dict, embedder: Path) -> None:
    result = run_cli("deploy", str(embedder), "--provider", "local", "--name", "ghost", "--add-model", "embed", env=home)
    assert result.returncode == 2, result.stderr
    assert "there is no local endpoint ghost to add model embed to" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
    root = Path(home["CLOUDLLM_HOME"])
    assert not (root / "local" / "ghost").exists() and not (root / "endpoints" / "ghost.json").exists()


def test_add_model_under_the_first_models_name_is_refused(shared: dict, home: dict, embedder: Path) -> None:
    result = run_cli("deploy", str(embedder), "--provider", "local", "--name", "shared", "--add-model", "tiny-gpt2", env=home)
    assert result.returncode == 2, result.stderr
    assert "tiny-gpt2 is the name of endpoint shared's first model" in result.stderr.splitlines()[-1]
    assert "tiny-gpt2" not in _status(home, "shared")["details"]["models"]


def test_an_added_model_that_fails_to_load_leaves_nothing(shared: dict, home: dict, broken_embedder: Path) -> None:
    result = run_cli("deploy", str(broken_embedder), "--provider", "local", "--name", "shared", "--add-model", "bad", env=home)
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the model failed to load" in errors[0] and "Traceback" not in result.stderr, result.stderr
    folder = Path(home["CLOUDLLM_HOME"]) / "local" / "shared" / "models" / "bad"
    assert not folder.exists()
    assert sorted(_status(home, "shared")["details"]["models"]) == ["embed"]
    assert _invoke(home, "shared", PROMPT, "--max-new-tokens", "8") == shared["gpt2_alone"]  # the rest still serve
    assert _invoke(home, "shared", PROMPT, "--model", "embed") == shared["embedder_alone"]


def test_removing_an_added_model_stops_only_it(shared: dict, home: dict, embedder: Path) -> None:
    added = run_cli("deploy", str(embedder), "--provider", "local", "--name", "shared", "--add-model", "other", env=home)
    assert added.returncode == 0, added.stderr
    models = _status(home, "shared")["details"]["models"]
    other_pid, embed_pid = models["other"]["pid"], models["embed"]["pid"]
    folder = Path(home["CLOUDLLM_HOME"]) / "local" / "shared" / "models" / "other"
    relays = _relay_pids(folder)
    assert relays and all(_running(pid) for pid in relays)

    removed = run_cli("delete", "shared", "--model", "other", env=home)
    assert removed.returncode == 0 and removed.stdout.strip() == "model other of endpoint shared deleted", removed.stderr
    eventually(lambda: not _running(other_pid) and not any(_running(pid) for pid in relays), what="model other's server and relay gone")
    assert not folder.exists()
    assert _running(embed_pid) and _running(shared["base_pid"])
    assert sorted(_status(home, "shared")["details"]["models"]) == ["embed"]
    assert _invoke(home, "shared", PROMPT, "--model", "embed") == shared["embedder_alone"]
    line = assert_one_line_error(run_cli("invoke", "shared", PROMPT, "--model", "other", env=home), contains="no model 'other'")
    assert "tiny-gpt2, embed" in line


@pytest.mark.parametrize(
    "model, message",
    [("nope", "endpoint shared has no model 'nope'; its models are: tiny-gpt2, embed"), ("tiny-gpt2", "tiny-gpt2 is endpoint shared's first model")],
)
def test_removing_a_model_the_endpoint_lacks_or_its_first_is_one_line(shared: dict, home: dict, model: str, message: str) -> None:
    assert_one_line_error(run_cli("delete", "shared", "--model", model, env=home), contains=message)
    assert sorted(_status(home, "shared")["details"]["models"]) == ["embed"]


def test_a_new_version_of_an_added_model_replaces_it_behind_the_same_url(shared: dict, home: dict, tmp_path: Path) -> None:
    newer = build_tiny_bert(tmp_path / "embedder", head="base", seed=1)
    before = _status(home, "shared")["details"]["models"]["embed"]
    updated = run_cli("deploy", str(newer), "--provider", "local", "--name", "shared", "--add-model", "embed", env=home)
    assert updated.returncode == 0, updated.stderr
    after = _status(home, "shared")["details"]["models"]["embed"]
    assert after["url"] == before["url"] and after["pid"] != before["pid"] and after["version"] != before["version"]
    eventually(lambda: not _running(before["pid"]), what="the previous server of model embed gone")
    answer = _invoke(home, "shared", PROMPT, "--model", "embed")
    assert answer != shared["embedder_alone"]
    assert httpx.post(after["url"] + "/invocations", json={"inputs": PROMPT}, timeout=60).json() == answer  # the relay reaches the new one
    assert _status(home, "shared")["details"]["pid"] == shared["base_pid"]


def test_delete_stops_every_model_and_relay(shared: dict, home: dict) -> None:
    root = Path(home["CLOUDLLM_HOME"]) / "local" / "shared"
    status = _status(home, "shared")
    pids = [status["details"]["pid"], *(m["pid"] for m in status["details"]["models"].values()), *_relay_pids(root)]
    assert len(pids) == 4 and all(_running(pid) for pid in pids)  # two servers, two relays
    deleted = run_cli("delete", "shared", env=home)
    assert deleted.returncode == 0, deleted.stderr
    eventually(lambda: not any(_running(pid) for pid in pids), what="every server and relay of shared gone")
    assert not root.exists()
