"""LoRA adapters of the engine runtimes on SageMaker, against the offline emulator.

tgi: the adapters ride in the model (LORA_ADAPTERS + AdditionalModelDataSources), read at start;
vllm (LMI): adapter inference components. What was created is read back with plain boto3. No
GPU here: TGI and LMI are stood in for by the artifact's own server, which loads the same peft
folders from where SageMaker would mount them; the emulator answers an adapter TGI did not load
with the base model, as TGI does, so the check that stops that is cloudllm's. What the engines
refuse (GPT-2 adapters, other modules) is refused at plan time, before anything is created.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from cloudllm import api
from cloudllm.errors import EXIT_BAD_INPUT, UserError
from cloudllm.providers.sagemaker import components as comp
from cloudllm.providers.sagemaker.tgi_adapters import CHANNEL_ROOT, LORA_ENV
from cloudllm.testing import eventually
from cloudllm.testing.tiny_adapters import build_tiny_lora
from cloudllm_emulators.sagemaker import ROLE_ARN
from tests.conftest import assert_one_line_error, run_cli

PARAMETERS = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def aws(sagemaker_emulator) -> dict:
    return {name: boto3.client(name) for name in ("sagemaker", "s3")}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"CLOUDLLM_HOME": str(tmp_path_factory.mktemp("home"))}


@pytest.fixture(scope="module")
def loras(llama_loras: dict[str, Path]) -> dict[str, Path]:
    return llama_loras  # tests/conftest.py: q_proj/v_proj adapters of the tiny Llama


def _deploy(emulator, model: Path, name: str, **kwargs):
    kwargs.setdefault("bucket", f"{emulator.bucket}/models")
    kwargs.setdefault("options", {"role": ROLE_ARN})
    kwargs.setdefault("instance", "ml.g5.xlarge")
    return api.deploy(model, provider="sagemaker", name=name, **kwargs)


def _answer(name: str, adapter: str | None = None) -> str:
    return api.invoke(name, "Hello there", provider="sagemaker", parameters=PARAMETERS, adapter=adapter)


def _model_of(aws, endpoint: str, model: str) -> dict:
    sm = aws["sagemaker"]
    component = sm.describe_inference_component(InferenceComponentName=comp.model_component(endpoint, model))
    return sm.describe_model(ModelName=component["Specification"]["ModelName"])


def _nothing_of(aws, name: str) -> None:
    sm = aws["sagemaker"]
    assert [e for e in sm.list_endpoints()["Endpoints"] if e["EndpointName"] == name] == []
    assert [m for m in sm.list_models()["Models"] if m["ModelName"].startswith(name + "-")] == []


# --- tgi: LORA_ADAPTERS in the model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tgi(sagemaker_emulator, tiny_llama: Path, loras: dict[str, Path]) -> str:
    adapters = {name: str(loras[name]) for name in ("legal", "support")}
    result = _deploy(sagemaker_emulator, tiny_llama, "sm-tgi-lora", runtime="tgi", adapters=adapters)
    assert result.endpoint.state == "InService"
    return "sm-tgi-lora"


def test_tgi_adapters_are_mounted_and_named_in_lora_adapters(tgi: str, aws, tiny_llama: Path, sagemaker_emulator) -> None:
    container = _model_of(aws, tgi, tiny_llama.name.lower())["PrimaryContainer"]
    assert container["Environment"][LORA_ENV] == f"legal={CHANNEL_ROOT}/legal,support={CHANNEL_ROOT}/support"
    sources = {s["ChannelName"]: s["S3DataSource"] for s in container["AdditionalModelDataSources"]}
    assert set(sources) == {"legal", "support"}
    for name, source in sources.items():
        assert (source["S3DataType"], source["CompressionType"]) == ("S3Prefix", "None")
        bucket, _, prefix = source["S3Uri"].removeprefix("s3://").partition("/")
        assert "/adapters/" in prefix and prefix.endswith("/")  # content-addressed: adapters/<digest>/
        keys = {o["Key"][len(prefix) :] for o in aws["s3"].list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
        assert keys == {"adapter_config.json", "adapter_model.safetensors"}, name
    # TGI keeps its adapters in the model: no adapter inference components
    listed = aws["sagemaker"].list_inference_components(EndpointNameEquals=tgi)["InferenceComponents"]
    assert [c["InferenceComponentName"] for c in listed] == [comp.model_component(tgi, tiny_llama.name.lower())]


def test_tgi_answers_each_adapter_differently(tgi: str) -> None:
    answers = {adapter: _answer(tgi, adapter) for adapter in (None, "legal", "support")}
    assert len(set(answers.values())) == 3, answers
    assert {a["name"] for a in api.list_adapters(tgi, provider="sagemaker")} == {"legal", "support"}


def test_an_unknown_adapter_is_refused_before_tgi_answers_with_the_base(tgi: str, aws, tiny_llama: Path, home: dict) -> None:
    # Straight to the endpoint, as TGI would: the base model answers an adapter it does not hold.
    component = comp.model_component(tgi, tiny_llama.name.lower())
    runtime = boto3.client("sagemaker-runtime")
    raw = runtime.invoke_endpoint(
        EndpointName=tgi, InferenceComponentName=component, ContentType="application/json",
        Body=json.dumps({"inputs": "Hello there", "parameters": {**PARAMETERS, "adapter_id": "nope"}}),
    )["Body"].read()  # fmt: skip
    assert json.loads(raw)[0]["generated_text"] == _answer(tgi)
    # cloudllm checks the name itself
    with pytest.raises(UserError) as unknown:
        _answer(tgi, "nope")
    assert "has no adapter named nope" in unknown.value.line() and "legal, support" in unknown.value.line()
    by_cli = run_cli("invoke", tgi, "Hello", "--provider", "sagemaker", "--adapter", "nope", env=home)
    assert_one_line_error(by_cli, contains="has no adapter named nope")


def test_tgi_adapters_change_by_redeploy_not_live(tgi: str, aws, sagemaker_emulator, tiny_llama: Path, loras: dict[str, Path]) -> None:
    with pytest.raises(UserError) as live:
        api.add_adapter(tgi, "extra", loras["extra"], provider="sagemaker")
    assert "reads its adapters (LORA_ADAPTERS) only when it starts" in live.value.line() and f"deploy {tgi} again" in live.value.line()
    with pytest.raises(UserError, match="only when it starts"):
        api.remove_adapter(tgi, "legal", provider="sagemaker")

    key = tiny_llama.name.lower()
    before = _model_of(aws, tgi, key)["ModelName"]
    config = aws["sagemaker"].describe_endpoint(EndpointName=tgi)["EndpointConfigName"]
    adapters = {name: str(loras[name]) for name in ("legal", "extra")}
    changed = _deploy(sagemaker_emulator, tiny_llama, tgi, runtime="tgi", adapters=adapters)
    assert changed.action == "update"
    after = _model_of(aws, tgi, key)
    assert after["ModelName"] != before  # a new model for the component
    assert after["PrimaryContainer"]["Environment"][LORA_ENV] == f"extra={CHANNEL_ROOT}/extra,legal={CHANNEL_ROOT}/legal"
    assert aws["sagemaker"].describe_endpoint(EndpointName=tgi)["EndpointConfigName"] == config  # the endpoint stays
    assert {a["name"] for a in api.list_adapters(tgi, provider="sagemaker")} == {"legal", "extra"}
    assert _answer(tgi, "extra") != _answer(tgi)
    with pytest.raises(UserError, match="has no adapter named support"):
        _answer(tgi, "support")
    again = _deploy(sagemaker_emulator, tiny_llama, tgi, runtime="tgi", adapters=adapters)
    assert again.action == "unchanged"


def test_deleting_the_tgi_endpoint_leaves_nothing(tgi: str, aws) -> None:
    api.delete(tgi, provider="sagemaker")
    _nothing_of(aws, tgi)


# --- vllm (LMI): adapter inference components on a Llama base -----------------------------------------
def test_vllm_adapters_are_components_on_a_llama_base(sagemaker_emulator, aws, tiny_llama: Path, loras: dict[str, Path], tmp_path: Path) -> None:
    name = "sm-vllm-lora"
    _deploy(sagemaker_emulator, tiny_llama, name, runtime="vllm", adapters={"legal": str(loras["legal"])})
    key = tiny_llama.name.lower()
    spec = aws["sagemaker"].describe_inference_component(InferenceComponentName=comp.adapter_component(name, key, "legal"))["Specification"]
    assert spec["BaseInferenceComponentName"] == comp.model_component(name, key) and "/adapters/" in spec["Container"]["ArtifactUrl"]
    env = _model_of(aws, name, key)["PrimaryContainer"]["Environment"]
    assert LORA_ENV not in env
    # LMI loads adapter components only with LoRA on, up to the rank it started with (vLLM's default 16 at least)
    assert (env["OPTION_ENABLE_LORA"], env["OPTION_MAX_LORA_RANK"], env["OPTION_MAX_LORAS"]) == ("true", "16", "4")
    assert _answer(name, "legal") != _answer(name)

    wide = build_tiny_lora(tiny_llama, tmp_path / "wide", rank=32, seed=4)
    with pytest.raises(UserError) as live:
        api.add_adapter(name, "wide", wide, provider="sagemaker")
    assert "endpoint sm-vllm-lora's LMI was not started to load an adapter of rank 32" in live.value.line()
    assert comp.adapter_component(name, key, "wide") not in {
        c["InferenceComponentName"] for c in aws["sagemaker"].list_inference_components(EndpointNameEquals=name)["InferenceComponents"]
    }
    # what cloudllm refuses there, the emulator's LMI refuses too: straight through boto3, the component fails
    bucket = sagemaker_emulator.bucket.removeprefix("s3://").split("/", 1)[0]
    for path in wide.iterdir():
        aws["s3"].upload_file(str(path), bucket, f"by-hand/wide/{path.name}")
    sm = aws["sagemaker"]
    sm.create_inference_component(InferenceComponentName=f"{name}-by-hand", EndpointName=name,
                                  Specification={"BaseInferenceComponentName": comp.model_component(name, key),
                                                 "Container": {"ArtifactUrl": f"s3://{bucket}/by-hand/wide/"}})  # fmt: skip
    failed = eventually(lambda: (d := sm.describe_inference_component(InferenceComponentName=f"{name}-by-hand"))["InferenceComponentStatus"] == "Failed" and d)
    assert "LoRA rank 32 is greater than max_lora_rank 16" in failed["FailureReason"]
    sm.delete_inference_component(InferenceComponentName=f"{name}-by-hand")
    eventually(lambda: f"{name}-by-hand" not in {c["InferenceComponentName"] for c in sm.list_inference_components(EndpointNameEquals=name)["InferenceComponents"]})

    before = _model_of(aws, name, key)["ModelName"]
    redeployed = _deploy(sagemaker_emulator, tiny_llama, name, runtime="vllm", adapters={"legal": str(loras["legal"]), "wide": str(wide)})
    assert redeployed.action == "update"
    after = _model_of(aws, name, key)
    assert after["ModelName"] != before and after["PrimaryContainer"]["Environment"]["OPTION_MAX_LORA_RANK"] == "32"
    assert _answer(name, "wide") not in (_answer(name), _answer(name, "legal"))
    api.delete(name, provider="sagemaker")
    _nothing_of(aws, name)


# --- what the engines would refuse, refused at plan time ------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_lora(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(tiny_gpt2, tmp_path_factory.mktemp("gpt2-lora") / "lora")


@pytest.mark.parametrize("runtime", ["tgi", "vllm"])
def test_gpt2_adapters_are_refused_for_the_engines_at_plan_time(sagemaker_emulator, aws, tiny_gpt2: Path, gpt2_lora: Path, runtime: str, home: dict) -> None:
    with pytest.raises(UserError) as refused:
        api.plan(tiny_gpt2, provider="sagemaker", name="sm-bad-lora", runtime=runtime, instance="ml.g5.xlarge",
                 adapters={"legal": str(gpt2_lora)}, bucket=f"{sagemaker_emulator.bucket}/models", options={"role": ROLE_ARN})  # fmt: skip
    assert f"the {runtime} runtime serves LoRA adapters only on Llama-shaped models" in refused.value.line()
    assert "GPT2LMHeadModel" in refused.value.line()
    by_cli = run_cli(
        "deploy", str(tiny_gpt2), "--name", "sm-bad-lora", "--provider", "sagemaker", "--runtime", runtime, "--instance", "ml.g5.xlarge",
        "--adapter", f"legal={gpt2_lora}", "--bucket", f"{sagemaker_emulator.bucket}/models", "--role", ROLE_ARN, env=home,
    )  # fmt: skip
    assert_one_line_error(by_cli, code=EXIT_BAD_INPUT, contains="only on Llama-shaped models")
    _nothing_of(aws, "sm-bad-lora")
    bucket, _, prefix = f"{sagemaker_emulator.bucket}/models/sm-bad-lora/".removeprefix("s3://").partition("/")
    assert "Contents" not in aws["s3"].list_objects_v2(Bucket=bucket, Prefix=prefix)  # nothing uploaded


def test_modules_tgi_does_not_load_are_refused(sagemaker_emulator, aws, tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "embed-lora", safe_serialization=True)
    with pytest.raises(UserError) as refused:
        _deploy(sagemaker_emulator, tiny_llama, "sm-bad-modules", runtime="tgi", adapters={"embed": str(tmp_path / "embed-lora")})
    assert "changes embed_tokens, which tgi does not load LoRA into" in refused.value.line()
    _nothing_of(aws, "sm-bad-modules")


def test_more_adapters_than_tgi_can_mount_are_refused(sagemaker_emulator, aws, tiny_llama: Path, loras: dict[str, Path]) -> None:
    six = {f"a{i}": str(loras["legal"]) for i in range(6)}
    with pytest.raises(UserError, match="a model takes at most 5"):
        _deploy(sagemaker_emulator, tiny_llama, "sm-six", runtime="tgi", adapters=six)
    _nothing_of(aws, "sm-six")
