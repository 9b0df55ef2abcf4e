"""SageMaker inference components through cloudllm against the offline emulator: scale to zero and the
hidden wake, several models on one endpoint, adapters, delete, bad input. What was created is checked
with plain boto3; the model servers are real processes."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest

from cloudllm import api
from cloudllm.console import Reporter
from cloudllm.errors import UserError
from cloudllm.providers.sagemaker import components as comp
from cloudllm.testing import eventually
from cloudllm.testing.tiny_models import build_tiny_gpt2
from cloudllm_emulators.sagemaker import ROLE_ARN
from cloudllm_emulators.sagemaker_components import ComponentBackend
from tests.conftest import assert_one_line_error, run_cli

PARAMETERS = {"max_new_tokens": 4, "do_sample": False}


class Waits(Reporter):
    """Keeps the steps and the status lines of the waits."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.updates: list[str] = []

    def step(self, message: str) -> None:
        self.steps.append(message)

    @contextmanager
    def waiting(self, message: str):
        self.updates.append(message)
        yield self.updates.append


@pytest.fixture(scope="module")
def aws(sagemaker_emulator) -> dict:
    return {name: boto3.client(name) for name in ("sagemaker", "application-autoscaling", "cloudwatch", "s3")}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"CLOUDLLM_HOME": str(tmp_path_factory.mktemp("home"))}


@pytest.fixture(autouse=True)
def _quick_wake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ComponentBackend, "wake_seconds", 1.0)  # a real wake provisions an instance: minutes


def _deploy(emulator, model: Path, name: str, **kwargs):
    kwargs.setdefault("bucket", f"{emulator.bucket}/models")
    kwargs.setdefault("options", {"role": ROLE_ARN})
    kwargs.setdefault("runtime", "handler")
    kwargs.setdefault("instance", "ml.m5.xlarge")
    return api.deploy(model, provider="sagemaker", name=name, **kwargs)


def _components(aws, endpoint: str) -> dict[str, dict]:
    sm = aws["sagemaker"]
    listed = sm.list_inference_components(EndpointNameEquals=endpoint)["InferenceComponents"]
    return {c["InferenceComponentName"]: sm.describe_inference_component(InferenceComponentName=c["InferenceComponentName"]) for c in listed}


def _left(aws, name: str) -> dict[str, list]:
    """Everything of endpoint `name` in the emulator."""
    sm = aws["sagemaker"]
    return {
        "endpoints": [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"] if e["EndpointName"] == name],
        "components": list(_components(aws, name)),
        "configs": [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"] if c["EndpointConfigName"].startswith(name + "-")],
        "models": [m["ModelName"] for m in sm.list_models()["Models"] if m["ModelName"].startswith(name + "-")],
        "scaling": [
            t["ResourceId"] for t in aws["application-autoscaling"].describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
            if t["ResourceId"].startswith(f"inference-component/{name}-")
        ],
        "alarms": [a["AlarmName"] for a in aws["cloudwatch"].describe_alarms()["MetricAlarms"] if a["AlarmName"].startswith(name + "-")],
    }  # fmt: skip


def _nothing_left(aws, name: str) -> None:
    assert _left(aws, name) == {"endpoints": [], "components": [], "configs": [], "models": [], "scaling": [], "alarms": []}


# --- scale to zero and several models -----------------------------------------------------------
@pytest.fixture(scope="module")
def zero(sagemaker_emulator, tiny_gpt2: Path) -> str:
    result = _deploy(sagemaker_emulator, tiny_gpt2, "sm-zero", min_instances=0, max_instances=2)
    assert result.endpoint.state == "InService"
    return "sm-zero"


def test_scale_to_zero_deploys_a_component_on_managed_instances(zero: str, aws, tiny_gpt2: Path) -> None:
    sm = aws["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName=zero)
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert "ModelName" not in variant and config["ExecutionRoleArn"] == ROLE_ARN
    assert variant["ManagedInstanceScaling"] == {"Status": "ENABLED", "MinInstanceCount": 0, "MaxInstanceCount": 2}
    assert variant["RoutingConfig"] == {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"}

    component = comp.model_component(zero, tiny_gpt2.name.lower())
    described = _components(aws, zero)[component]
    assert described["RuntimeConfig"] == {"DesiredCopyCount": 1, "CurrentCopyCount": 1}
    assert described["Specification"]["ComputeResourceRequirements"]["MinMemoryRequiredInMb"] >= 1024
    assert described["Specification"]["ModelName"].startswith(zero + "-")

    scaling = aws["application-autoscaling"]
    resource = comp.scaling_resource(component)
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])["ScalableTargets"]
    assert (target["ScalableDimension"], target["MinCapacity"], target["MaxCapacity"]) == (comp.COPY_DIMENSION, 0, 2)
    policies = {p["PolicyType"]: p for p in scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]}
    tracking = policies["TargetTrackingScaling"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerInferenceComponentInvocationsPerCopy"
    (alarm,) = aws["cloudwatch"].describe_alarms(AlarmNames=[comp.wake_alarm(component)])["MetricAlarms"]
    assert alarm["MetricName"] == "NoCapacityInvocationFailures" and alarm["Namespace"] == "AWS/SageMaker"
    assert alarm["Dimensions"] == [{"Name": "InferenceComponentName", "Value": component}]
    assert alarm["AlarmActions"] == [policies["StepScaling"]["PolicyARN"]]


def test_the_plan_shows_idle_cost_and_the_wake(sagemaker_emulator, tiny_gpt2: Path) -> None:
    plan = api.plan(tiny_gpt2, provider="sagemaker", name="sm-zero-plan", runtime="handler", instance="ml.m5.xlarge",
                    min_instances=0, bucket=f"{sagemaker_emulator.bucket}/models", options={"role": ROLE_ARN})  # fmt: skip
    text = "\n".join(plan.describe())
    assert "$0/h while idle" in text and "wake" in text


def test_the_first_invoke_after_idle_waits_through_the_wake(zero: str, aws, tiny_gpt2: Path) -> None:
    sm = aws["sagemaker"]
    component = comp.model_component(zero, tiny_gpt2.name.lower())
    awake = api.invoke(zero, "Hello", provider="sagemaker", parameters=PARAMETERS)
    # Idle: Application Auto Scaling takes the copies to zero (here set as it would).
    sm.update_inference_component_runtime_config(InferenceComponentName=component, DesiredRuntimeConfig={"CopyCount": 0})
    eventually(lambda: sm.describe_inference_component(InferenceComponentName=component)["RuntimeConfig"]["CurrentCopyCount"] == 0, what="zero copies")
    assert sm.describe_endpoint(EndpointName=zero)["ProductionVariants"][0]["CurrentInstanceCount"] == 0  # nothing billed
    waits = Waits()
    woken = api.invoke(zero, "Hello", provider="sagemaker", parameters=PARAMETERS, wake_timeout=300, reporter=waits)
    assert woken == awake
    assert waits.updates[0] == f"waking {zero} from zero"
    assert f"no capacity yet: inference component {component} has no copies" in waits.updates[1:]
    assert sm.describe_inference_component(InferenceComponentName=component)["RuntimeConfig"]["CurrentCopyCount"] == 1


def test_a_wake_that_takes_too_long_is_one_line(zero: str, aws, tiny_gpt2: Path, home: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    sm = aws["sagemaker"]
    component = comp.model_component(zero, tiny_gpt2.name.lower())
    monkeypatch.setattr(ComponentBackend, "wake_seconds", 600.0)
    sm.update_inference_component_runtime_config(InferenceComponentName=component, DesiredRuntimeConfig={"CopyCount": 0})
    eventually(lambda: sm.describe_inference_component(InferenceComponentName=component)["RuntimeConfig"]["CurrentCopyCount"] == 0, what="zero copies")
    result = run_cli("invoke", zero, "Hello", "--provider", "sagemaker", "--wake-timeout", "2", env=home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    progress, *_, error = result.stderr.strip().splitlines()
    assert progress == f"waking {zero} from zero..."  # then how long it has waited, then one error line
    assert error.startswith(f"error: endpoint {zero} did not wake from zero within 2s") and "--wake-timeout" in error
    monkeypatch.setattr(ComponentBackend, "wake_seconds", 1.0)
    sm.update_inference_component_runtime_config(InferenceComponentName=component, DesiredRuntimeConfig={"CopyCount": 1})
    eventually(lambda: sm.describe_inference_component(InferenceComponentName=component)["InferenceComponentStatus"] == "InService", what="awake")


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("second") / "second-gpt2", seed=7)


def test_add_model_serves_a_second_model_beside_the_first(zero: str, aws, sagemaker_emulator, second_model: Path, tiny_gpt2: Path, home: dict) -> None:
    result = _deploy(sagemaker_emulator, second_model, zero, add_model="second", min_instances=0, max_instances=2)
    assert result.endpoint.state == "InService"
    components = _components(aws, zero)
    assert set(components) == {comp.model_component(zero, tiny_gpt2.name.lower()), comp.model_component(zero, "second")}
    first = api.invoke(zero, "Hello", provider="sagemaker", parameters=PARAMETERS, wake_timeout=300)
    second = api.invoke(zero, "Hello", provider="sagemaker", parameters=PARAMETERS, model="second", wake_timeout=300)
    assert first != second  # another model's weights answer
    by_cli = run_cli("invoke", zero, "Hello", "--provider", "sagemaker", "--model", "second", "--max-new-tokens", "4", env=home)
    assert by_cli.returncode == 0, by_cli.stderr
    assert by_cli.stdout.strip() == second.strip()
    unknown = run_cli("invoke", zero, "Hello", "--provider", "sagemaker", "--model", "third", env=home)
    assert_one_line_error(unknown, contains="has no model named third")


def test_delete_removes_the_components_before_the_endpoint(zero: str, aws, sagemaker_emulator, home: dict) -> None:
    deleted = run_cli("delete", zero, "--provider", "sagemaker", "--purge-artifacts", "--bucket", f"{sagemaker_emulator.bucket}/models", env=home)
    assert deleted.returncode == 0, deleted.stderr
    _nothing_left(aws, zero)
    assert "deleted inference component" in deleted.stderr or deleted.returncode == 0


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "contains"),
    [
        ({"min_instances": 0, "instance": "ml.t2.medium"}, "ml.t2.medium cannot host"),
        ({"min_instances": 0, "rollout": "canary:10"}, "inference components update copy by copy"),
        ({"min_instances": 0, "wait": False}, "--no-wait cannot set up scale to zero"),
        ({"add_model": "extra"}, "there is no endpoint sm-bad-ic"),
    ],
)
def test_bad_input_is_one_line_and_creates_nothing(sagemaker_emulator, aws, tiny_gpt2: Path, overrides: dict, contains: str) -> None:
    with pytest.raises(UserError) as error:
        _deploy(sagemaker_emulator, tiny_gpt2, "sm-bad-ic", **overrides)
    assert contains in error.value.line() and "\n" not in error.value.line()
    _nothing_left(aws, "sm-bad-ic")


def test_adapters_need_a_container_that_loads_them_live(sagemaker_emulator, aws, tiny_gpt2: Path, tmp_path: Path) -> None:
    from cloudllm.testing.tiny_adapters import build_tiny_lora

    adapter = build_tiny_lora(tiny_gpt2, tmp_path / "lora")
    with pytest.raises(UserError) as error:
        _deploy(sagemaker_emulator, tiny_gpt2, "sm-bad-ic", adapters={"legal": str(adapter)})  # the HF inference DLC
    assert "cannot load them while it serves" in error.value.line()
    _nothing_left(aws, "sm-bad-ic")


# --- adapters as adapter inference components (vllm: LMI loads them while it serves) ---------------
@pytest.fixture(scope="module")
def loras(llama_loras: dict[str, Path]) -> dict[str, Path]:
    return llama_loras  # vLLM serves LoRA only on models that implement SupportsLoRA (Llama-shaped; GPT-2 does not)


@pytest.fixture(scope="module")
def tenants(sagemaker_emulator, tiny_llama: Path, loras: dict[str, Path]) -> str:
    adapters = {name: str(loras[name]) for name in ("legal", "support")}
    result = _deploy(sagemaker_emulator, tiny_llama, "sm-lora", runtime="vllm", instance="ml.g5.xlarge", adapters=adapters)
    assert result.endpoint.state == "InService"
    return "sm-lora"


def _answer(name: str, adapter: str | None = None) -> str:
    return api.invoke(name, "Hello there", provider="sagemaker", parameters=PARAMETERS, adapter=adapter)


def test_each_adapter_is_a_component_and_answers_differently(tenants: str, aws, tiny_llama: Path) -> None:
    base = comp.model_component(tenants, tiny_llama.name.lower())
    components = _components(aws, tenants)
    for adapter in ("legal", "support"):
        spec = components[comp.adapter_component(tenants, tiny_llama.name.lower(), adapter)]["Specification"]
        assert spec["BaseInferenceComponentName"] == base
        assert "/adapters/" in spec["Container"]["ArtifactUrl"]
    answers = {adapter: _answer(tenants, adapter) for adapter in (None, "legal", "support")}
    assert len(set(answers.values())) == 3, answers  # the base and each adapter answer differently
    assert _answer(tenants, "legal") == answers["legal"]  # and each the same every time


def test_adapters_are_added_and_removed_live(tenants: str, aws, loras: dict[str, Path], tiny_llama: Path) -> None:
    base = comp.model_component(tenants, tiny_llama.name.lower())
    copies_before = aws["sagemaker"].describe_inference_component(InferenceComponentName=base)["LastModifiedTime"]
    api.add_adapter(tenants, "extra", loras["extra"], provider="sagemaker")
    assert {a["name"] for a in api.list_adapters(tenants, provider="sagemaker")} == {"legal", "support", "extra"}
    assert _answer(tenants, "extra") not in (_answer(tenants), _answer(tenants, "legal"))
    api.remove_adapter(tenants, "extra", provider="sagemaker")
    assert {a["name"] for a in api.list_adapters(tenants, provider="sagemaker")} == {"legal", "support"}
    with pytest.raises(UserError) as unknown:
        _answer(tenants, "extra")
    assert "extra" in unknown.value.line()
    with pytest.raises(UserError, match="has no adapter named extra"):
        api.remove_adapter(tenants, "extra", provider="sagemaker")
    # The base's copies never restarted.
    assert aws["sagemaker"].describe_inference_component(InferenceComponentName=base)["LastModifiedTime"] == copies_before


def test_a_changed_model_moves_its_component_and_keeps_the_adapters(tenants: str, aws, sagemaker_emulator, tiny_llama: Path, loras: dict[str, Path]) -> None:
    sm = aws["sagemaker"]
    adapters = {name: str(loras[name]) for name in ("legal", "support")}
    same = _deploy(sagemaker_emulator, tiny_llama, tenants, runtime="vllm", instance="ml.g5.xlarge", adapters=adapters)
    assert same.action == "unchanged"
    base = comp.model_component(tenants, tiny_llama.name.lower())
    old_model = sm.describe_inference_component(InferenceComponentName=base)["Specification"]["ModelName"]
    config = sm.describe_endpoint(EndpointName=tenants)["EndpointConfigName"]

    changed = _deploy(sagemaker_emulator, tiny_llama, tenants, runtime="vllm", instance="ml.g5.xlarge", adapters=adapters, serving={"max_new_tokens": 16})
    assert changed.action == "update"
    assert sm.describe_endpoint(EndpointName=tenants)["EndpointConfigName"] == config  # the endpoint stays as it is
    new_model = sm.describe_inference_component(InferenceComponentName=base)["Specification"]["ModelName"]
    assert new_model != old_model
    with pytest.raises(Exception):
        sm.describe_model(ModelName=old_model)  # swept once the component moved
    answers = {adapter: _answer(tenants, adapter) for adapter in (None, "legal", "support")}
    assert len(set(answers.values())) == 3, answers  # the new copies serve the adapters too
    again = _deploy(sagemaker_emulator, tiny_llama, tenants, runtime="vllm", instance="ml.g5.xlarge", adapters=adapters, serving={"max_new_tokens": 16})
    assert again.action == "unchanged"


def test_deleting_an_endpoint_of_adapters_leaves_nothing(tenants: str, aws) -> None:
    api.delete(tenants, provider="sagemaker")
    _nothing_left(aws, tenants)
