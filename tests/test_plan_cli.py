"""`cloudllm plan`, `cloudllm instances` and `deploy --dry-run` through the real CLI in subprocesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from cloudllm.plan import plan_json_schema
from cloudllm.providers.base import Endpoint, Provider, ResourceChange
from tests.conftest import assert_one_line_error, run_cli

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "plan-schema.json"
# Far past any machine's RAM or GPU: 1M tokens x 1024 requests of KV cache.
HUGE = ("--max-total-tokens", "1048576", "--max-batch", "1024")


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose config claims a million positions, so huge token budgets are valid input."""
    from cloudllm.testing.tiny_models import build_tiny_llama

    folder = build_tiny_llama(tmp_path_factory.mktemp("models") / "long-llama")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1_048_576
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def test_schema_file_is_the_generated_schema():
    assert _schema() == json.loads(json.dumps(plan_json_schema())), (
        "docs/plan-schema.json is stale: regenerate it with\n"
        "  python -c \"import json; from cloudllm.plan import plan_json_schema; "
        "print(json.dumps(plan_json_schema(), indent=2, sort_keys=True))\" > docs/plan-schema.json"
    )
    jsonschema.Draft202012Validator.check_schema(_schema())


def test_plan_json_validates_and_carries_fit_memory_shards_cost_resources_diff(tiny_gpt2: Path):
    result = run_cli("plan", str(tiny_gpt2), "--name", "tiny", "--max-total-tokens", "128", "--max-batch", "2", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    jsonschema.validate(plan, _schema())
    assert plan["schema_version"] == 1 and plan["provider"] == "local"
    fit = plan["fit"]
    assert fit["verdict"] == "fits" and fit["target"] == "local" and fit["shards"] is None
    assert (fit["max_total_tokens"], fit["max_batch"]) == (128, 2)
    memory = fit["memory"]
    assert memory["kv_cache_bytes"] == 2 * 2 * 4 * 16 * 4 * 128 * 2  # K,V x n_layer x n_head x head_dim x fp32 x tokens x batch
    assert memory["total_bytes"] == sum(memory[k] for k in ("weights_bytes", "kv_cache_bytes", "activations_bytes", "overhead_bytes"))
    assert plan["cost"] is None and plan["resources"]["instance"] is None
    assert plan["diff"]["action"] == "create"
    assert plan["diff"]["changes"] == [{"resource": "endpoint", "name": "tiny", "action": "create", "reason": "new endpoint"}]


def test_plan_text_shows_verdict_cost_and_changes(tiny_gpt2: Path):
    result = run_cli("plan", str(tiny_gpt2), "--name", "tiny")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "plan for endpoint tiny on local" in out
    assert "fit:      fits this machine's RAM" in out and "margin" in out
    assert "memory: weights" in out and "KV cache" in out
    assert "cost:     none (this machine)" in out
    assert "create endpoint tiny  (new endpoint)" in out


def test_plan_that_does_not_fit_exits_3_with_the_shortfall(long_llama: Path):
    result = run_cli("plan", str(long_llama), *HUGE)
    assert "does not fit this machine's RAM" in result.stdout and "short by" in result.stdout
    line = assert_one_line_error(result, code=3, contains="short by")
    assert "--max-batch" in line and "--force" in line


def test_deploy_refuses_what_does_not_fit_and_creates_nothing(long_llama: Path, cloudllm_home: Path):
    result = run_cli("deploy", str(long_llama), "--name", "huge", *HUGE)
    assert "plan: create endpoint huge (local)" in result.stderr  # the short plan comes first
    result.stderr = result.stderr.split("\n", 1)[1]
    assert_one_line_error(result, code=3, contains="does not fit")
    assert not (cloudllm_home / "local" / "huge").exists()
    assert not (cloudllm_home / "endpoints" / "huge.json").exists()


def test_dry_run_prints_the_plan_and_force_overrides_the_verdict(long_llama: Path, cloudllm_home: Path):
    refused = run_cli("deploy", str(long_llama), "--name", "huge", "--dry-run", *HUGE)
    assert refused.returncode == 3
    assert "dry run: would create endpoint huge" in refused.stdout and "does not fit" in refused.stdout
    forced = run_cli("deploy", str(long_llama), "--name", "huge", "--dry-run", "--force", *HUGE)
    assert forced.returncode == 0, forced.stderr
    as_json = run_cli("deploy", str(long_llama), "--name", "huge", "--dry-run", "--force", "--json", *HUGE)
    plan = json.loads(as_json.stdout)["plan"]
    jsonschema.validate(plan, _schema())
    assert plan["fit"]["fits"] is False
    assert not (cloudllm_home / "local" / "huge").exists()


class MemoryProvider(Provider):
    """An emulated cloud: endpoints live in a dict, deploy records the plan's fingerprint like a real provider."""

    name = "sagemaker"
    endpoints: dict[str, Endpoint] = {}

    def describe_changes(self, plan):
        existing = self.endpoints.get(plan.spec.name)
        action = {"create": "create", "update": "update", "unchanged": "unchanged"}[plan.action]
        changes = [ResourceChange(resource="model", name=plan.spec.name, action=action, reason="; ".join(plan.reasons))]
        if existing and existing.instance != plan.spec.instance:
            changes.append(ResourceChange(resource="endpoint-config", name=plan.spec.name, action="update", reason="instance changed"))
        return changes

    def deploy(self, plan, reporter):
        self.endpoints[plan.spec.name] = Endpoint(
            name=plan.spec.name, provider=self.name, state="InService", instance=plan.spec.instance,
            digest=plan.digest, details=dict(plan.fingerprint),
        )  # fmt: skip
        return self.endpoints[plan.spec.name]

    def update(self, plan, existing, reporter):
        return self.deploy(plan, reporter)

    def get(self, name):
        return self.endpoints.get(name)

    def list(self):
        return list(self.endpoints.values())

    def delete(self, name, *, purge_artifacts=False, reporter=None):
        self.endpoints.pop(name, None)

    def invoke(self, name, body):
        return {}


@pytest.fixture
def emulated_cloud(monkeypatch: pytest.MonkeyPatch) -> MemoryProvider:
    MemoryProvider.endpoints = {}
    monkeypatch.setattr("cloudllm.api.get_provider", lambda name, region=None, options=None: MemoryProvider(region, options))
    return MemoryProvider


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (so the emulated provider is seen); exit code, stdout, stderr."""
    from cloudllm.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_diff_create_then_unchanged_then_update(tiny_gpt2: Path, emulated_cloud, capsys):
    base = ("--provider", "sagemaker", "--instance", "ml.g5.xlarge", "--runtime", "tgi", "--name", "diff")
    code, out, _ = cli(capsys, "plan", str(tiny_gpt2), *base, "--json")
    first = json.loads(out)
    jsonschema.validate(first, _schema())
    assert first["diff"]["action"] == "create" and first["diff"]["changes"][0]["reason"] == "new endpoint"
    code, out, err = cli(capsys, "deploy", str(tiny_gpt2), *base)
    assert code == 0, err
    assert "plan: create endpoint diff (sagemaker) on ml.g5.xlarge (tgi, 1 GPU): fits ml.g5.xlarge" in err
    assert "$1.41/h" in err
    code, out, _ = cli(capsys, "plan", str(tiny_gpt2), *base, "--json")
    second = json.loads(out)["diff"]
    assert (second["action"], second["reasons"]) == ("unchanged", ["nothing changed"])
    code, out, _ = cli(capsys, "plan", str(tiny_gpt2), *base, "--max-new-tokens", "17", "--json")
    third = json.loads(out)["diff"]
    assert third["action"] == "update" and third["reasons"] == ["code or serving settings changed"]
    code, out, _ = cli(capsys, "deploy", str(tiny_gpt2), *base[:3], "ml.g6.xlarge", *base[4:], "--dry-run")
    assert "dry run: would update endpoint diff (instance ml.g5.xlarge -> ml.g6.xlarge)" in out
    assert "update endpoint-config diff  (instance changed)" in out
    assert emulated_cloud.endpoints["diff"].instance == "ml.g5.xlarge"  # a dry run changes nothing


def test_cloud_plan_shows_shards_cost_and_refuses_what_does_not_fit(long_llama: Path, emulated_cloud, capsys):
    base = ("--provider", "sagemaker", "--runtime", "handler", "--name", "big")
    code, out, _ = cli(capsys, "plan", str(long_llama), *base, "--instance", "ml.g5.12xlarge", "--max-instances", "2", "--json")
    plan = json.loads(out)
    assert code == 0
    assert plan["resources"] == {
        "instance": "ml.g5.12xlarge", "accelerator": "NVIDIA A10G", "gpus_per_instance": 4, "gpu_memory_gib": 24.0,
        "min_instances": 1, "max_instances": 2, "shards": 1,
    }  # fmt: skip
    assert plan["cost"]["per_hour_min"] == 7.09 and plan["cost"]["per_hour_max"] == 14.18
    assert plan["cost"]["per_30_days_max"] == round(7.09 * 2 * 720, 2)
    code, out, err = cli(capsys, "deploy", str(long_llama), *base, "--instance", "ml.g5.xlarge", "--max-total-tokens", "1048576", "--max-batch", "64")
    assert code == 3 and "big" not in emulated_cloud.endpoints
    assert "error: does not fit ml.g5.xlarge" in err and "--max-batch" in err
    code, out, err = cli(capsys, "deploy", str(long_llama), *base, "--instance", "ml.g5.xlarge", "--max-total-tokens", "1048576", "--max-batch", "64", "--force")
    assert code == 0 and "big" in emulated_cloud.endpoints


@pytest.mark.parametrize(
    "instance, contains",
    [
        ("ml.g5.xlarg", "unknown SageMaker instance type 'ml.g5.xlarg'. did you mean ml.g5.xlarge"),
        ("g2-standard-8", "g2-standard-8 is a Vertex AI machine type, not a SageMaker instance type"),
    ],
)
def test_bad_instance_names(tiny_gpt2: Path, emulated_cloud, capsys, instance, contains):
    code, _, err = cli(capsys, "plan", str(tiny_gpt2), "--provider", "sagemaker", "--instance", instance)
    assert code == 2 and contains in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, contains",
    [
        (("--max-total-tokens", "4096"), "beyond the 256 tokens this model handles (n_positions in config.json)"),
        (("--max-total-tokens", "2000000"), "max_total_tokens"),
        (("--quantize", "int3"), "unknown quantization"),
    ],
)
def test_bad_plan_input_is_one_line(tiny_gpt2: Path, args, contains):
    assert_one_line_error(run_cli("plan", str(tiny_gpt2), *args), code=2, contains=contains)


def test_model_folder_without_a_needed_config_field(tiny_gpt2: Path, tmp_path: Path):
    folder = tmp_path / "no-layers"
    shutil.copytree(tiny_gpt2, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["n_layer"]
    (folder / "config.json").write_text(json.dumps(config))
    line = assert_one_line_error(run_cli("plan", str(folder)), code=2, contains="has no num_hidden_layers")
    assert "n_layer" in line


def test_diff_against_the_sagemaker_emulator(tiny_gpt2: Path, sagemaker_emulator):
    """The real provider's describe calls: create, then unchanged, then what each change would touch."""
    base = [str(tiny_gpt2), "--name", "plan-diff", "--provider", "sagemaker", "--runtime", "handler", "--instance", "ml.m5.xlarge",
            "--bucket", f"{sagemaker_emulator.bucket}/models", "--role", sagemaker_emulator.role, "--max-instances", "2"]  # fmt: skip

    def diff(*extra: str) -> dict:
        result = run_cli("plan", *base, *extra, "--json")
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        jsonschema.validate(document, _schema())
        return document["diff"]

    def changes(d: dict) -> dict[str, str]:
        return {c["resource"]: c["action"] for c in d["changes"]}

    first = diff()
    assert first["action"] == "create"
    assert changes(first) == {"artifacts": "create", "model": "create", "endpoint-config": "create", "endpoint": "create",
                              "scaling-target": "create", "scaling-policy": "create"}  # fmt: skip
    deployed = run_cli("deploy", *base)
    assert deployed.returncode == 0, deployed.stderr
    try:
        assert diff()["action"] == "unchanged"
        code = diff("--max-new-tokens", "9")
        assert code["reasons"] == ["code or serving settings changed"]
        # Settings ride in the model's environment: the artifacts under the prefix stay as they are.
        assert changes(code)["artifacts"] == "unchanged" and changes(code)["scaling-target"] == "update"
        moved = diff("--instance", "ml.m5.2xlarge")
        assert moved["reasons"] == ["instance ml.m5.xlarge -> ml.m5.2xlarge"]
        assert changes(moved)["artifacts"] == "unchanged"  # the same bundle: nothing to upload
        assert changes(diff("--max-instances", "1"))["scaling-target"] == "delete"
    finally:
        assert run_cli("delete", "plan-diff", "--purge-artifacts").returncode == 0


def test_a_cloud_plan_needs_no_account(tiny_gpt2: Path, tmp_path: Path):
    """A laptop or CI job with no AWS credentials, region, role or bucket still gets fit and cost;
    the diff is unknown. deploy --dry-run makes every check deploy makes, so it asks for them."""
    import os
    import subprocess

    from tests.conftest import CLOUDLLM

    nowhere = str(tmp_path / "none")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=nowhere, AWS_SHARED_CREDENTIALS_FILE=nowhere, AWS_EC2_METADATA_DISABLED="true")
    args = [str(tiny_gpt2), "--provider", "sagemaker", "--instance", "ml.g5.xlarge", "--name", "offline"]
    for region in ([], ["--region", "eu-west-1"]):
        result = subprocess.run([CLOUDLLM, "plan", *args, *region, "--json"], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        jsonschema.validate(plan, _schema())
        assert plan["fit"]["verdict"] == "fits" and plan["cost"]["per_hour_min"] == 1.41
        assert plan["diff"]["action"] == "unknown" and plan["diff"]["changes"] == []
        assert ("no AWS region" if not region else "no AWS credentials") in plan["diff"]["reasons"][0]
    dry = subprocess.run([CLOUDLLM, "deploy", *args, "--region", "eu-west-1", "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(dry, code=2, contains="needs an execution role")


def test_bart_family_configs_are_planned(tmp_path: Path):
    """BART/mBART/Pegasus/Marian name their shape encoder_layers, decoder_attention_heads, d_model, *_ffn_dim."""
    from cloudllm.testing.tiny_models import build_tiny_bart

    folder = build_tiny_bart(tmp_path / "tiny-bart")
    result = run_cli("plan", str(folder), "--json", "--max-total-tokens", "64", "--max-batch", "1")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["model"]["task"] in ("summarization", "text2text-generation") and plan["fit"]["verdict"] == "fits"
    # decoder self-attention (64 tokens) + cross-attention over the input (64: half the model's 128 positions),
    # K,V x 2 decoder layers x 32 wide x fp32
    assert (plan["fit"]["max_input_tokens"], plan["fit"]["max_total_tokens"]) == (64, 64)
    assert plan["fit"]["memory"]["kv_cache_bytes"] == 2 * 2 * 32 * 4 * (64 + 64)


def test_instances_lists_both_providers_with_date_and_region():
    result = run_cli("instances")
    assert result.returncode == 0, result.stderr
    assert "sagemaker us-east-1" in result.stdout and "vertex us-central1" in result.stdout and "as of " in result.stdout
    assert "ml.g5.xlarge" in result.stdout and "a3-highgpu-8g" in result.stdout
    only = run_cli("instances", "--provider", "vertex", "--json")
    data = json.loads(only.stdout)
    assert {row["provider"] for row in data["instances"]} == {"vertex"}
    assert data["as_of"] and data["sources"]["vertex"]


def test_instances_that_fit_a_model_cheapest_first(long_llama: Path):
    result = run_cli("instances", "--fits", str(long_llama), "--provider", "sagemaker", "--max-total-tokens", "2048", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["instances"]
    prices = [row["price_per_hour"] for row in rows]
    priced = [p for p in prices if p is not None]
    assert rows and priced == sorted(priced) and prices == priced + [None] * (len(prices) - len(priced))  # unpriced rows last
    assert all(row["fit"]["fits"] and row["provider"] == "sagemaker" for row in rows)
    assert all(row["kind"] == "gpu" for row in rows)  # tgi by default for a text-generation model
    text = run_cli("instances", "--fits", str(long_llama), "--runtime", "handler", "--max-total-tokens", "2048")
    assert "ml.c5.large" in text.stdout.splitlines()[3]  # the cheapest fit, CPU allowed for a tiny model
    assert "SHARDS" in text.stdout and "MARGIN" in text.stdout
    none = run_cli("instances", "--fits", str(long_llama), "--runtime", "handler", *HUGE)
    assert none.returncode == 0 and "no instance in the catalog fits" in none.stdout


def test_instances_flags_need_fits():
    assert_one_line_error(run_cli("instances", "--max-batch", "4"), code=2, contains="go with --fits")


def test_vertex_plan_against_the_emulator(vertex_emulator, long_llama: Path):
    base = ("plan", str(long_llama), "--provider", "vertex", "--bucket", vertex_emulator.bucket, "--name", "vx")
    result = run_cli(*base, "--instance", "g2-standard-24", "--max-instances", "3", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    jsonschema.validate(plan, _schema())
    assert plan["resources"]["instance"] == "g2-standard-24" and plan["resources"]["gpus_per_instance"] == 2
    assert plan["fit"]["fits"] and plan["fit"]["shards"] == 1  # the smallest count that fits, of the 2 L4s
    assert plan["cost"]["region"] == "us-central1" and plan["cost"]["per_hour_max"] == round(2.3009 * 3, 2)
    assert plan["diff"]["action"] == "create"
    assert {c["action"] for c in plan["diff"]["changes"]} == {"create"} and len(plan["diff"]["changes"]) > 1
    n1 = run_cli(*base, "--instance", "n1-standard-4", "--accelerator", "NVIDIA_TESLA_T4:1", "--runtime", "handler")
    assert n1.returncode == 0, n1.stderr
    assert "handler on n1-standard-4 + 1x NVIDIA_TESLA_T4: 1x NVIDIA T4 16 GiB" in n1.stdout
    assert "$0.62/h" in n1.stdout
    wrong = run_cli(*base, "--instance", "ml.g5.xlarge")
    assert_one_line_error(wrong, code=2, contains="ml.g5.xlarge is a SageMaker instance type, not a Vertex AI machine type")


def test_plan_of_a_141_gb_model_reads_no_weight_bytes(tmp_path: Path):
    """Header-only sparse shards of a Llama-70B (141 GB): the CLI reads headers, never the holes."""
    from benchmarks.bench_plan import build_sparse_model, run_plan

    folder = tmp_path / "llama-70b"
    weights = build_sparse_model(folder)
    _, bytes_read, proc = run_plan(folder, tmp_path / "home", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"]["weight_bytes"] >= weights > 140e9
    # Python's own imports read ~10 MB; one shard alone is 4.7 GB.
    assert bytes_read < 64e6, f"plan read {bytes_read} bytes"


def test_weights_never_hashed_here_make_the_diff_unknown_not_changed(tiny_gpt2: Path, emulated_cloud, capsys, monkeypatch, tmp_path: Path):
    """A cold hash cache (another machine, a cleared cache): plan names the weights by identity, which
    cannot match the deployed sha256, so it says it does not know instead of "weights changed"."""
    import cloudllm.hashing

    base = ("--provider", "sagemaker", "--instance", "ml.g5.xlarge", "--runtime", "tgi", "--name", "cold")
    code, _, err = cli(capsys, "deploy", str(tiny_gpt2), *base)
    assert code == 0, err
    monkeypatch.setenv("CLOUDLLM_HOME", str(tmp_path / "other-home"))
    monkeypatch.setattr(cloudllm.hashing, "_cache", None)
    code, out, _ = cli(capsys, "plan", str(tiny_gpt2), *base, "--json")
    diff = json.loads(out)["diff"]
    assert diff["action"] == "unknown" and "not hashed on this machine" in diff["reasons"][0]
    code, out, _ = cli(capsys, "plan", str(tiny_gpt2), *base, "--max-new-tokens", "17", "--json")
    diff = json.loads(out)["diff"]
    assert diff["action"] == "update" and diff["reasons"][0] == "code or serving settings changed"
    code, _, err = cli(capsys, "deploy", str(tiny_gpt2), *base, "--dry-run")  # deploy paths hash: exact again
    code, out, _ = cli(capsys, "plan", str(tiny_gpt2), *base, "--json")
    assert json.loads(out)["diff"]["action"] == "unchanged"


def test_the_aws_region_is_read_as_botocore_reads_it_without_boto3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`cloudllm plan` resolves the region from the environment and the config file itself (a boto3 session costs
    more than the rest of its checks); where it cannot be sure, it says so (False) and a session decides."""
    import boto3

    from cloudllm.providers.sagemaker.session import configured_region

    config = tmp_path / "config"
    config.write_text("[default]\nregion = us-west-2\n\n[profile ci]\nregion = eu-west-1\ns3 =\n  max_concurrent_requests = 4\n\n[profile bare]\noutput = json\n")
    for key in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    cases = [({}, "us-west-2"), ({"AWS_PROFILE": "ci"}, "eu-west-1"), ({"AWS_PROFILE": "bare"}, None),
             ({"AWS_PROFILE": "ci", "AWS_DEFAULT_REGION": "ap-south-1"}, "ap-south-1"), ({"AWS_PROFILE": "elsewhere"}, False)]  # fmt: skip
    for env, expected in cases:
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert configured_region() == expected, env
            if expected is not False:
                assert boto3.Session().region_name == expected, env  # what botocore itself resolves
    config.write_text("[default]\nregion = a\n[default]\nregion = b\n")  # configparser refuses: not sure
    assert configured_region() is False
