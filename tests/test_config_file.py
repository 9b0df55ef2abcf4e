"""cloudllm.yaml: one pydantic model, its JSON Schema, and bad files named by file:line and field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from cloudllm.config_file import CloudLLMFile, default_file_id, file_schema, load_file
from cloudllm.errors import UserError
from cloudllm.redact import MASK, is_secret_key, redact, redact_text
from tests.conftest import assert_one_line_error, run_cli

EXAMPLES = Path(__file__).parent.parent / "examples"


def _write(folder: Path, text: str, name: str = "cloudllm.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def project(tmp_path: Path, tiny_gpt2: Path) -> Path:
    """A folder with models/tiny (a link to the tiny GPT-2), where cloudllm.yaml files are written."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_gpt2, target_is_directory=True)
    return tmp_path


# (file text, line, text the error must contain). Lines count from 1.
BAD_FILES = {
    "not-yaml": ("endpoints:\n  - name: a\n    model: [models/tiny\n", 4, "not valid YAML"),
    "empty-file": ("\n", 1, "the file is empty"),
    "not-a-mapping": ("- name: a\n  model: models/tiny\n", 1, "expected a mapping with an `endpoints:` list, got a list"),
    "top-level-typo": ("endpoint:\n  - name: a\n    model: models/tiny\n", 1, "unknown setting 'endpoint'. did you mean 'endpoints'?"),
    "endpoint-key-typo": (
        "endpoints:\n  - name: a\n    model: models/tiny\n    instanec: ml.g5.xlarge\n",
        4,
        "endpoints[0].instanec: unknown setting 'instanec'. did you mean 'instance'?",
    ),
    "nested-key-typo": (
        "endpoints:\n  - name: a\n    model: models/tiny\n    serving:\n      max_batch: 4\n",
        5,
        "endpoints[0].serving.max_batch: unknown setting 'max_batch'. did you mean 'max_batch_size'?",
    ),
    "wrong-type": (
        "endpoints:\n  - name: a\n    model: models/tiny\n  - name: b\n    model: models/tiny\n    max_instances: two\n",
        6,
        "endpoints[1].max_instances: Input should be a valid integer",
    ),
    "out-of-range": ("endpoints:\n  - name: a\n    model: models/tiny\n    max_instances: 0\n", 4, "greater than or equal to 1 (got 0)"),
    "tags-not-mapping": ("endpoints:\n  - name: a\n    model: models/tiny\n    tags: [team]\n", 4, "endpoints[0].tags: expected a mapping"),
    "endpoint-not-mapping": ("endpoints:\n  - models/tiny\n", 2, "endpoints[0]: expected a mapping of settings"),
    "endpoints-not-list": ("endpoints:\n  name: a\n", 1, "endpoints: expected a list"),
    "duplicate-names": (
        "endpoints:\n  - name: a\n    model: models/tiny\n  - name: a\n    model: models/tiny\n",
        4,
        "endpoints[1].name: 'a' is listed twice (first on line 2)",
    ),
    "duplicate-yaml-key": ("endpoints:\n  - name: a\n    model: models/tiny\n    name: b\n", 4, "duplicate key 'name' (also on line 2)"),
    "invalid-name": ("endpoints:\n  - name: my_model\n    model: models/tiny\n", 2, "endpoints[0].name: use 1-63 letters, digits and hyphens"),
    "missing-name": ("endpoints:\n  - model: models/tiny\n", 2, "endpoints[0].name: name is required. add `name:`"),
    "min-above-max": (
        "endpoints:\n  - name: a\n    model: models/tiny\n    max_instances: 2\n    min_instances: 3\n",
        5,
        "endpoints[0].min_instances: min_instances (3) is above max_instances (2)",
    ),
    "missing-model-folder": ("endpoints:\n  - name: a\n    model: models/nope\n", 3, "endpoints[0].model: model folder 'models/nope' does not exist"),
    "model-is-a-file": ("endpoints:\n  - name: a\n    model: cloudllm.yaml\n", 3, "model folder 'cloudllm.yaml' is not a folder"),
    "empty-endpoints": ("endpoints: []\n", 1, "endpoints: no endpoints listed"),
    "unknown-provider": (
        "endpoints:\n  - name: a\n    model: models/tiny\n    provider: sagemkaer\n",
        4,
        "endpoints[0].provider: unknown provider 'sagemkaer'. did you mean 'sagemaker'?",
    ),
    "bad-rollout": ("endpoints:\n  - name: a\n    model: models/tiny\n    rollout: sideways\n", 4, "endpoints[0].rollout: use all-at-once, canary:PCT"),
    "bad-default": (
        "defaults:\n  provider: local\n  max_instances: many\nendpoints:\n  - name: a\n    model: models/tiny\n",
        3,
        "defaults.max_instances: Input should be a valid integer",
    ),
    "default-out-of-range": (
        "defaults:\n  scale_in_cooldown: -5\nendpoints:\n  - name: a\n    model: models/tiny\n",
        2,
        "defaults.scale_in_cooldown: Input should be greater than or equal to 0",
    ),
    "name-in-defaults": ("defaults:\n  name: x\nendpoints:\n  - name: a\n    model: models/tiny\n", 2, "defaults.name: unknown setting 'name'"),
    "alias-bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
        "endpoints:\n  - name: a\n    model: models/tiny\n    options: {x: *e}\n",
        1,
        "the file expands to more than 100,000 values",
    ),
    "bad-file-id": ("file_id: My File\nendpoints:\n  - name: a\n    model: models/tiny\n", 1, "file_id: String should match pattern"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_line_with_file_line_and_field(case: str, project: Path, cloudllm_home: Path) -> None:
    text, line, contains = BAD_FILES[case]
    path = _write(project, text)
    result = run_cli("apply", "-f", str(path))
    message = assert_one_line_error(result, code=2, contains=f"{path}:{line}: ")
    assert contains.lower() in message.lower(), message
    assert result.stdout == ""
    assert _created(cloudllm_home) == []


def _created(home: Path) -> list[str]:
    """Endpoint records and local endpoint folders in CLOUDLLM_HOME."""
    return [p.name for folder in (home / "endpoints", home / "local") if folder.exists() for p in folder.iterdir() if p.name != "logs"]


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("apply", "-f", str(tmp_path / "nope.yaml")), code=2, contains="nope.yaml does not exist")
    assert_one_line_error(run_cli("apply", "-f", str(tmp_path)), code=2, contains="is a folder")


def test_default_file_is_cloudllm_yaml_in_the_current_folder(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import CLOUDLLM

    result = subprocess.run([CLOUDLLM, "apply"], cwd=tmp_path, capture_output=True, text=True)
    assert_one_line_error(result, code=2, contains="cloudllm.yaml does not exist")


def test_relative_model_paths_are_read_from_the_files_folder(project: Path, tmp_path: Path, monkeypatch) -> None:
    deploy = project / "deploy"
    deploy.mkdir()
    path = _write(deploy, "endpoints:\n  - name: a\n    model: ../models/tiny\n  - name: b\n    model: ~/elsewhere\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "elsewhere").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the working folder plays no part
    loaded = load_file(path)
    assert loaded.endpoints[0].model == str((project / "models" / "tiny").resolve())
    assert loaded.endpoints[1].model == str((tmp_path / "home" / "elsewhere").resolve())

    # models/tiny exists from the working folder, not from deploy/: the error says where it looked.
    monkeypatch.chdir(project)
    _write(deploy, "endpoints:\n  - name: a\n    model: models/tiny\n")
    with pytest.raises(UserError) as err:
        load_file(deploy / "cloudllm.yaml")
    assert f"resolved to {deploy / 'models' / 'tiny'}" in err.value.line()
    assert "read from the folder of cloudllm.yaml" in err.value.line()


def test_defaults_merge_key_by_key(project: Path) -> None:
    path = _write(
        project,
        """
        defaults:
          provider: local
          tags: {team: ml, env: prod}
          serving: {max_batch_size: 4}
          options: {profile: ci}
        endpoints:
          - name: a
            model: models/tiny
            tags: {env: dev}
            serving: {max_new_tokens: 8}
          - name: b
            model: models/tiny
            provider: local
        """,
    )
    a, b = load_file(path).endpoints
    assert a.tags == {"team": "ml", "env": "dev"}
    assert a.serving.max_batch_size == 4 and a.serving.max_new_tokens == 8
    assert a.options == {"profile": "ci"} and b.tags == {"team": "ml", "env": "prod"}


def test_file_id_is_stable_per_repository_path(tmp_path: Path) -> None:
    repo = tmp_path / "checkout-1" / "my-service"
    (repo / ".git").mkdir(parents=True)
    (repo / "deploy").mkdir()
    other = tmp_path / "checkout-2" / "my-service"
    (other / ".git").mkdir(parents=True)
    assert default_file_id(repo / "deploy" / "cloudllm.yaml") == "my-service-deploy-cloudllm-yaml"
    assert default_file_id(other / "deploy" / "cloudllm.yaml") == "my-service-deploy-cloudllm-yaml"
    assert default_file_id(repo / "cloudllm.prod.yaml") != default_file_id(repo / "cloudllm.yaml")
    long = default_file_id(repo / ("x" * 100) / "cloudllm.yaml")
    assert len(long) <= 63 and long.startswith("my-service-")


def test_explicit_file_id(project: Path) -> None:
    path = _write(project, "file_id: shop-prod\nendpoints:\n  - name: a\n    model: models/tiny\n")
    assert load_file(path).file_id == "shop-prod"


# --- the schema ------------------------------------------------------------------------------------
def test_schema_command_prints_the_models_schema_with_descriptions() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema == json.loads(json.dumps(file_schema()))
    jsonschema.Draft202012Validator.check_schema(schema)
    described = 0
    for model in [schema, *schema["$defs"].values()]:
        for name, prop in model.get("properties", {}).items():
            assert prop.get("description"), f"{model.get('title')}.{name} has no description"
            described += 1
    assert described > 40


def test_schema_accepts_what_the_loader_accepts_and_rejects_typos() -> None:
    validator = jsonschema.Draft202012Validator(file_schema())
    good = {"defaults": {"provider": "sagemaker"}, "endpoints": [{"name": "a", "model": "m", "serving": {"max_batch_size": 2}}]}
    assert not list(validator.iter_errors(good))
    CloudLLMFile.model_validate(good)
    assert list(validator.iter_errors({"endpoints": [{"name": "a", "model": "m", "instanec": "x"}]}))
    assert list(validator.iter_errors({"endpoints": []}))


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("cloudllm*.yaml")))
def test_examples_follow_the_schema(example: str) -> None:
    data = yaml.safe_load((EXAMPLES / example).read_text())
    errors = [e.message for e in jsonschema.Draft202012Validator(file_schema()).iter_errors(data)]
    assert not errors, errors
    CloudLLMFile.model_validate(data)


def test_every_provider_has_an_example() -> None:
    assert {p.name for p in EXAMPLES.glob("cloudllm*.yaml")} >= {"cloudllm.local.yaml", "cloudllm.sagemaker.yaml", "cloudllm.vertex.yaml"}


# --- secrets -----------------------------------------------------------------------------------------
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        (f"aws_secret_access_key={AWS_SECRET}", AWS_SECRET),
        (f"the secret is {AWS_SECRET}.", AWS_SECRET),
        (f"token {HF_TOKEN} rejected", HF_TOKEN),
        ("key AKIAIOSFODNN7EXAMPLE is not valid", "AKIAIOSFODNN7EXAMPLE"),
        ("https://alice:s3cr3tpass@example.com/repo", "s3cr3tpass"),
        ("Authorization: Bearer abc.def.ghijklmnop", "abc.def.ghijklmnop"),
        ("HF_TOKEN: xyz-not-a-real-shape", "xyz-not-a-real-shape"),
        ('{"password": "hunter2hunter2"}', "hunter2hunter2"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEv\n-----END PRIVATE KEY-----", "MIIEv"),
        ("ya29.a0AfH6SMBxxxxxxxxxxxxxxxxxxxxxxxx", "a0AfH6SMB"),
    ],
)
def test_redact_text_masks_credential_shapes(text: str, leaked: str) -> None:
    masked = redact_text(text)
    assert leaked not in masked and MASK in masked


@pytest.mark.parametrize(
    "text",
    [
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "git 3b18e512dba79e4c8300dd08aeb37f8e728b8dad",
        "max_new_tokens: Input should be greater than or equal to 1",
        "s3://my-bucket/models/tiny-gpt2/0123456789abcdef",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "tokenizer: gpt2",
    ],
)
def test_redact_text_leaves_ordinary_text_alone(text: str) -> None:
    assert redact_text(text) == text


def test_redact_walks_structures_by_key_name() -> None:
    data = {
        "options": {"hf_token": "anything", "SecretAccessKey": "x", "api-key": "y", "kms_key": "arn:aws:kms:...", "role": "arn:aws:iam::1:role/r"},
        "serving": {"max_new_tokens": 5, "max_input_tokens": 7},
        "list": [{"password": "p"}, f"pre {HF_TOKEN}"],
        "n": 3,
    }
    out = redact(data)
    assert out["options"] == {"hf_token": MASK, "SecretAccessKey": MASK, "api-key": MASK, "kms_key": "arn:aws:kms:...", "role": "arn:aws:iam::1:role/r"}
    assert out["serving"] == {"max_new_tokens": 5, "max_input_tokens": 7}
    assert out["list"] == [{"password": MASK}, f"pre {MASK}"] and out["n"] == 3
    assert data["options"]["hf_token"] == "anything"  # a copy, the input is untouched
    assert [k for k in ("token", "auth", "key", "private_key", "Authorization", "GOOGLE_API_KEY") if not is_secret_key(k)] == []
    assert [k for k in ("max_new_tokens", "kms_key", "tokenizer", "author", "key_name", "monkey") if is_secret_key(k)] == []


def test_errors_never_print_a_secret_from_the_file(project: Path) -> None:
    path = _write(project, f"endpoints:\n  - name: {HF_TOKEN}\n    model: models/tiny\n")
    line = assert_one_line_error(run_cli("apply", "-f", str(path)), code=2, contains=f"{path}:2: endpoints[0].name")
    assert HF_TOKEN not in line and MASK in line

    path = _write(project, "endpoints:\n  - name: a\n    model: models/tiny\n    tags:\n      hf_token: [1]\n")
    line = assert_one_line_error(run_cli("apply", "-f", str(path)), code=2, contains=f"{path}:5: endpoints[0].tags.hf_token")


def test_docs_schema_file_is_current() -> None:
    """docs/cloudllm.schema.json (what the examples point editors at) is `cloudllm schema`, written out."""
    written = json.loads((Path(__file__).parent.parent / "docs" / "cloudllm.schema.json").read_text())
    assert written == json.loads(json.dumps(file_schema())), "regenerate: cloudllm schema > docs/cloudllm.schema.json"


def test_environment_variables_are_expanded_never_stored_literally(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = project / "cloudllm.yaml"
    path.write_text("endpoints:\n  - name: a\n    model: models/tiny\n    options: {hf_token: '${CLOUDLLM_TEST_TOKEN}', note: 'at ${CLOUDLLM_TEST_WHERE}!'}\n")
    monkeypatch.setenv("CLOUDLLM_TEST_TOKEN", "tok-123")
    monkeypatch.setenv("CLOUDLLM_TEST_WHERE", "home")
    assert load_file(path).endpoints[0].options == {"hf_token": "tok-123", "note": "at home!"}
    monkeypatch.delenv("CLOUDLLM_TEST_TOKEN")
    with pytest.raises(UserError, match=r"cloudllm.yaml:4: \$\{CLOUDLLM_TEST_TOKEN\} is not set"):
        load_file(path)
