"""LoRA adapters on a live local endpoint, through the real CLI and the openai client.

Real peft adapters on the tiny GPT-2 (their answers differ from the base and from each other),
served by the real model server the local provider starts; the server's pid shows that adding,
replacing and removing adapters never restarts it.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli, shared_local_home

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLOUDLLM_HOME for the module, so one deployed endpoint serves several tests."""
    yield from shared_local_home(tmp_path_factory)


@pytest.fixture(scope="module")
def lora(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cloudllm.testing.tiny_adapters import build_tiny_lora
    from cloudllm.testing.tiny_models import build_tiny_llama

    root = tmp_path_factory.mktemp("lora")
    dirs = {name: build_tiny_lora(tiny_gpt2, root / name, seed=seed) for name, seed in (("support", 1), ("legal", 2))}
    dirs["llama"] = build_tiny_lora(build_tiny_llama(root / "tiny-llama"), root / "llama-lora", seed=3)
    dirs["pickled"] = root / "pickled"
    shutil.copytree(dirs["support"], dirs["pickled"])
    (dirs["pickled"] / "adapter_model.safetensors").rename(dirs["pickled"] / "adapter_model.bin")
    return dirs


def _cli(home: dict, *args: str):
    return run_cli(*args, env=home)


def _answer(home: dict, *flags: str, name: str = "flow") -> str:
    result = _cli(home, "invoke", name, "Once upon a time", "--max-new-tokens", "8", *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _state(home: dict, name: str = "flow") -> dict:
    return json.loads((Path(home["CLOUDLLM_HOME"]) / "local" / name / "state.json").read_text())


def _deploy(home: dict, model: Path, *flags: str, name: str = "flow") -> dict:
    result = _cli(home, "deploy", str(model), "--name", name, "--json", *flags)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def shared(home, lora, tiny_gpt2) -> str:
    """Endpoint `shared`: the tiny GPT-2 with adapter `support`."""
    _deploy(home, tiny_gpt2, "--adapter", f"support={lora['support']}", name="shared")
    return "shared"


@pytest.mark.slow  # a dozen CLI runs and three deploys
def test_adapters_live_on_a_local_endpoint(home, lora, tiny_gpt2):
    created = _deploy(home, tiny_gpt2, "--adapter", f"support={lora['support']}")
    assert created["action"] == "create" and [a["name"] for a in created["plan"]["adapters"]] == ["support"]
    pid = _state(home)["pid"]
    base, support = _answer(home), _answer(home, "--adapter", "support")
    assert base != support
    # Stored by content, apart from the folder it came from.
    stored = Path(_state(home)["adapters"]["support"]["path"])
    assert stored.parent == Path(home["CLOUDLLM_HOME"]) / "adapters" and (stored / "adapter_model.safetensors").is_file()

    # Added live: no restart, and a third answer.
    added = _cli(home, "adapters", "add", "flow", "legal", str(lora["legal"]))
    assert added.returncode == 0, added.stderr
    legal = _answer(home, "--adapter", "legal")
    assert len({base, support, legal}) == 3
    listed = json.loads(_cli(home, "adapters", "list", "flow", "--json").stdout)
    assert [(a["name"], a["status"], a["rank"]) for a in listed] == [("legal", "loaded", 4), ("support", "loaded", 4)]
    assert _state(home)["pid"] == pid

    # The same deploy again keeps the adapter added live and changes nothing.
    again = _deploy(home, tiny_gpt2, "--adapter", f"support={lora['support']}")
    assert again["action"] == "unchanged", again["reasons"]

    # A deploy that changes only adapters applies them in place: `support` now serves legal's weights.
    swapped = _deploy(home, tiny_gpt2, "--adapter", f"support={lora['legal']}")
    assert swapped["action"] == "update" and swapped["reasons"] == ["adapters changed (now: legal, support)"]
    assert _state(home)["pid"] == pid
    assert _answer(home, "--adapter", "support") == legal

    # The OpenAI route picks an adapter by `model`, and lists them.
    import openai

    client = openai.OpenAI(base_url=swapped["endpoint"]["url"] + "/v1", api_key="none")
    assert {m.id for m in client.models.list().data} >= {"legal", "support"}
    completion = client.completions.create(model="legal", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert completion.choices[0].text == legal.rstrip("\n")

    # Removed live; asking for it afterwards is one line naming those left.
    removed = _cli(home, "adapters", "remove", "flow", "legal")
    assert removed.returncode == 0, removed.stderr
    assert_one_line_error(_cli(home, "invoke", "flow", "hi", "--adapter", "legal"), contains='unknown adapter "legal"; this server has: support')
    assert _state(home)["pid"] == pid
    # Removed for good: the next deploy does not bring it back.
    assert _deploy(home, tiny_gpt2, "--adapter", f"support={lora['legal']}")["action"] == "unchanged"


@pytest.mark.parametrize(
    "args, contains",
    [
        (("adapters", "add", "shared", "llama", "LLAMA"), "does not have: q_proj, v_proj"),
        (("adapters", "add", "shared", "pickled", "PICKLED"), "pickle weights"),
        (("adapters", "add", "shared", "bad name", "SUPPORT"), "adapter name 'bad name' is not valid"),
        (("adapters", "add", "nowhere", "x", "SUPPORT"), "no endpoint named 'nowhere'"),
        (("adapters", "remove", "shared", "ghost"), "endpoint shared has no adapter 'ghost'"),
        (("invoke", "shared", "hi", "--adapter", "ghost"), 'unknown adapter "ghost"'),
        (("invoke", "shared", "hi", "--model", "other"), "endpoint shared has no model 'other'; its models are: tiny-gpt2"),
        (("deploy", "MODEL", "--name", "shared", "--adapter", "llama=LLAMA"), "does not have: q_proj, v_proj"),
    ],
)
def test_bad_adapter_input_is_one_line_and_changes_nothing(home, lora, tiny_gpt2, shared, args, contains):
    before = _state(home, shared)
    paths = {"LLAMA": str(lora["llama"]), "PICKLED": str(lora["pickled"]), "SUPPORT": str(lora["support"]), "MODEL": str(tiny_gpt2)}
    for placeholder, path in paths.items():
        args = tuple(a.replace(placeholder, path) for a in args)
    assert_one_line_error(_cli(home, *args), contains=contains)
    assert _state(home, shared) == before


def test_add_and_remove_through_the_api_without_a_restart(home, lora, shared, monkeypatch):
    from cloudllm import api

    monkeypatch.setenv("CLOUDLLM_HOME", home["CLOUDLLM_HOME"])
    pid = _state(home, shared)["pid"]
    support = api.invoke(shared, "Once upon a time", parameters={"max_new_tokens": 8}, adapter="support")
    added = api.add_adapter(shared, "legal", lora["legal"])
    assert added["name"] == "legal" and added["status"] == "loaded"
    legal = api.invoke(shared, "Once upon a time", parameters={"max_new_tokens": 8}, adapter="legal")
    base = api.invoke(shared, "Once upon a time", parameters={"max_new_tokens": 8})
    assert len({support, legal, base}) == 3
    api.remove_adapter(shared, "legal")
    assert [a["name"] for a in api.list_adapters(shared)] == ["support"]
    assert _state(home, shared)["pid"] == pid


@pytest.mark.slow  # three deploys on a home of its own
def test_stored_adapter_copies_go_once_no_endpoint_references_them(lora, tiny_gpt2, tmp_path):
    own = {"CLOUDLLM_HOME": str(tmp_path)}
    stored = tmp_path / "adapters"
    try:
        _deploy(own, tiny_gpt2, "--adapter", f"support={lora['support']}", name="one")
        _deploy(own, tiny_gpt2, "--adapter", f"support={lora['support']}", "--adapter", f"legal={lora['legal']}", name="two")
        support, legal = (_state(own, "two")["adapters"][n]["digest"] for n in ("support", "legal"))
        # Folders cloudllm did not write: a digest-named one with a file of someone else's, and another name.
        foreign = stored / ("0" * 64)
        foreign.mkdir()
        (foreign / "adapter_model.safetensors").write_bytes(b"x")
        (foreign / "notes.txt").write_text("mine")
        (stored / "keep-me").mkdir()
        assert {p.name for p in stored.iterdir()} == {support, legal, "0" * 64, "keep-me"}

        # `adapters remove`: legal's copy was two's alone.
        assert _cli(own, "adapters", "remove", "two", "legal").returncode == 0
        assert not (stored / legal).exists() and (stored / support).is_dir()
        # A re-deploy that drops support: one still references it, so the copy stays; legal's comes back.
        _deploy(own, tiny_gpt2, "--adapter", f"legal={lora['legal']}", name="two")
        assert (stored / support).is_dir() and (stored / legal).is_dir()
        assert _answer(own, "--adapter", "legal", name="two") != _answer(own, "--adapter", "support", name="one")
        # `delete`: one was support's last user; two still serves legal.
        assert _cli(own, "delete", "one", "--yes").returncode == 0
        assert not (stored / support).exists() and (stored / legal).is_dir()
        assert _cli(own, "delete", "two", "--yes").returncode == 0
        assert {p.name for p in stored.iterdir()} == {"0" * 64, "keep-me"}
        assert (foreign / "notes.txt").read_text() == "mine"
    finally:
        for state in (tmp_path / "local").glob("*/state.json"):
            try:
                os.killpg(json.loads(state.read_text()).get("pid"), signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass


@pytest.mark.slow  # a deploy and a dozen CLI runs
def test_grpc_picks_the_adapter_as_the_rest_route_does(home, lora, tiny_gpt2):
    """adapter_id (a request parameter) or model_name picks the adapter over gRPC; tritonclient and `invoke --grpc --adapter`."""
    import numpy as np
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    _deploy(home, tiny_gpt2, "--adapter", f"support={lora['support']}", "--adapter", f"legal={lora['legal']}", name="grpcflow")
    rest = {a: _answer(home, *(("--adapter", a) if a else ()), name="grpcflow").rstrip("\n") for a in (None, "support", "legal")}
    assert len(set(rest.values())) == 3

    client = triton.InferenceServerClient(f"127.0.0.1:{_state(home, 'grpcflow')['grpc_port']}")
    base_name = client.get_model_metadata("").name

    def infer(model_name: str = "", **parameters) -> str:
        prompt = triton.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"Once upon a time"], dtype=object))
        result = client.infer(model_name, [prompt], parameters={"max_tokens": 8, "temperature": 0, **parameters})
        assert result.get_response().model_name == parameters.get("adapter_id", model_name or base_name)  # who answered
        return result.as_numpy("text_output")[0].decode()

    assert infer() == infer(base_name) == rest[None]
    for adapter in ("support", "legal"):
        assert infer(adapter_id=adapter) == infer(adapter) == infer(base_name, adapter_id=adapter) == rest[adapter]
    for call, fragment in ((lambda: infer(adapter_id="ghost"), 'unknown adapter "ghost"; this server has: legal, support'),
                           (lambda: infer("ghost"), "no model 'ghost' here; this server has: ")):  # fmt: skip
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert "NOT_FOUND" in str(refused.value.status()) and fragment in refused.value.message()
    with pytest.raises(InferenceServerException) as clash:
        infer("support", adapter_id="legal")
    assert "INVALID_ARGUMENT" in str(clash.value.status())

    # The CLI: --grpc --adapter sends adapter_id; an unknown one is one line naming those it has.
    for adapter in ("support", "legal"):
        assert _answer(home, "--grpc", "--adapter", adapter, name="grpcflow").rstrip("\n") == rest[adapter]
    assert _answer(home, "--grpc", name="grpcflow").rstrip("\n") == rest[None]
    assert_one_line_error(_cli(home, "invoke", "grpcflow", "hi", "--grpc", "--adapter", "ghost"), contains="this server has: legal, support")
    assert_one_line_error(_cli(home, "invoke", "grpcflow", "hi", "--grpc", "--model", "x"), contains="--grpc cannot pick a model")
