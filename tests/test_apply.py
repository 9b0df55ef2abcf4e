"""cloudllm apply: plan everything first, then create, update or leave each; prune only what the file created.

Most tests use the echo provider plugin (tests/fixtures/echo_provider: a real plugin that keeps
endpoints in a JSON file); the last ones run the local provider's real model servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloudllm.apply import ApplyResult, EndpointResult
from cloudllm.config_file import FILE_TAG
from cloudllm.errors import EXIT_FAILED, EXIT_OK, EXIT_PLAN_REFUSED
from tests.conftest import assert_one_line_error, run_cli
from tests.test_plugins import echo_plugin  # noqa: F401  (fixture)

HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
ENDPOINT_KEYS = {"name", "provider", "region", "action", "reasons", "done", "error", "state", "url", "digest", "changes"}
SUMMARY_KEYS = {"create", "update", "unchanged", "unknown", "delete", "keep", "refused", "failed"}


@pytest.fixture
def echo(echo_plugin: Path, tmp_path: Path) -> dict:  # noqa: F811
    """Environment for CLI runs that can reach the echo provider; its endpoints live in db.json."""
    return {"PYTHONPATH": str(echo_plugin), "ECHO_PROVIDER_DB": str(tmp_path / "db.json")}


@pytest.fixture
def project(tmp_path: Path, tiny_gpt2: Path) -> Path:
    folder = tmp_path / "repo"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "tiny").symlink_to(tiny_gpt2, target_is_directory=True)
    return folder


def write(folder: Path, text: str, name: str = "cloudllm.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def echo_db(env: dict) -> dict:
    path = Path(env["ECHO_PROVIDER_DB"])
    return json.loads(path.read_text()) if path.exists() else {}


def apply_json(*args: str, env: dict, code: int = 0) -> dict:
    result = run_cli("apply", *args, "--json", env=env)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def by_name(result: dict) -> dict[str, dict]:
    return {e["name"]: e for e in result["endpoints"]}


TWO = """
defaults:
  provider: echo
endpoints:
  - name: one
    model: models/tiny
  - name: two
    model: models/tiny
    serving: {max_new_tokens: 8}
"""


def test_apply_creates_and_a_second_apply_changes_nothing(project: Path, echo: dict) -> None:
    path = write(project, TWO)
    first = apply_json("-f", str(path), env=echo)
    assert set(first) == {"file", "file_id", "dry_run", "prune", "outcome", "summary", "endpoints"}
    assert first["outcome"] == "applied" and first["file"] == str(path) and first["file_id"] == "repo-cloudllm-yaml"
    assert first["summary"] == dict.fromkeys(SUMMARY_KEYS, 0) | {"create": 2}
    for item in first["endpoints"]:
        assert set(item) == ENDPOINT_KEYS
        assert item["action"] == "create" and item["done"] and item["error"] is None and item["state"] == "InService"
        assert item["reasons"] == ["new endpoint"] and item["digest"]
    db = echo_db(echo)
    assert sorted(db) == ["one", "two"] and all(e["calls"] == ["deploy"] for e in db.values())

    second = run_cli("apply", "-f", str(path), env=echo)
    assert second.returncode == 0, second.stderr
    assert "no change (2 endpoint(s) unchanged)" in second.stdout
    again = apply_json("-f", str(path), env=echo)
    assert again["outcome"] == "no-change" and again["summary"]["unchanged"] == 2
    assert [e["done"] for e in again["endpoints"]] == [True, True]
    assert all(e["calls"] == ["deploy"] for e in echo_db(echo).values())


def test_editing_one_endpoint_updates_only_it(project: Path, echo: dict) -> None:
    path = write(project, TWO)
    apply_json("-f", str(path), env=echo)
    write(project, TWO.replace("max_new_tokens: 8", "max_new_tokens: 16"))
    result = apply_json("-f", str(path), env=echo)
    assert result["outcome"] == "applied"
    assert by_name(result)["two"]["action"] == "update" and by_name(result)["two"]["reasons"] == ["code or serving settings changed"]
    assert by_name(result)["one"]["action"] == "unchanged"
    assert echo_db(echo)["two"]["calls"] == ["deploy", "update"] and echo_db(echo)["one"]["calls"] == ["deploy"]


def test_dry_run_changes_nothing(project: Path, echo: dict) -> None:
    path = write(project, TWO)
    result = apply_json("-f", str(path), "--dry-run", env=echo)
    assert result["outcome"] == "dry-run" and result["dry_run"] is True
    assert [(e["action"], e["done"]) for e in result["endpoints"]] == [("create", False), ("create", False)]
    assert echo_db(echo) == {}
    text = run_cli("apply", "-f", str(path), "--dry-run", env=echo)
    assert "would create   one (echo): new endpoint" in text.stdout and "dry run, nothing changed" in text.stdout


def test_removed_endpoints_are_pruned_only_with_prune_and_only_if_the_file_created_them(project: Path, echo: dict, cloudllm_home: Path) -> None:
    path = write(project, TWO)
    apply_json("-f", str(path), env=echo)
    # Not this file's: a manual deploy, and an endpoint of another file on the same provider.
    assert run_cli("deploy", str(project / "models" / "tiny"), "--provider", "echo", "--name", "manual", env=echo).returncode == 0
    other = write(project, "defaults: {provider: echo}\nendpoints:\n  - name: other\n    model: models/tiny\n", name="other.yaml")
    apply_json("-f", str(other), env=echo)

    write(project, TWO.split("  - name: two")[0])
    kept = apply_json("-f", str(path), env=echo)
    assert kept["outcome"] == "no-change"
    assert (by_name(kept)["two"]["action"], by_name(kept)["two"]["done"]) == ("keep", True)
    assert by_name(kept)["two"]["reasons"] == ["no longer in the file; `cloudllm apply --prune` deletes it"]
    assert set(by_name(kept)) == {"one", "two"}
    text = run_cli("apply", "-f", str(path), env=echo)
    assert "1 endpoint(s) no longer in the file were left alone" in text.stdout
    assert sorted(echo_db(echo)) == ["manual", "one", "other", "two"]

    planned = apply_json("-f", str(path), "--prune", "--dry-run", env=echo)
    assert by_name(planned)["two"]["action"] == "delete" and not by_name(planned)["two"]["done"]
    assert sorted(echo_db(echo)) == ["manual", "one", "other", "two"]

    pruned = apply_json("-f", str(path), "--prune", env=echo)
    assert pruned["outcome"] == "applied" and pruned["summary"]["delete"] == 1
    assert by_name(pruned)["two"]["done"] and by_name(pruned)["two"]["state"] is None
    assert sorted(echo_db(echo)) == ["manual", "one", "other"]
    assert not (cloudllm_home / "endpoints" / "two.json").exists()
    assert apply_json("-f", str(path), "--prune", env=echo)["outcome"] == "no-change"


def test_a_refused_plan_changes_nothing(project: Path, echo: dict) -> None:
    path = write(
        project,
        """
        endpoints:
          - name: fine
            model: models/tiny
            provider: echo
          - name: scaled
            model: models/tiny
            provider: local
            max_instances: 3
        """,
    )
    result = run_cli("apply", "-f", str(path), "--json", env=echo)
    line = assert_one_line_error(result, code=3, contains="plan refused for endpoint scaled")
    assert "autoscaling" in line and "nothing was changed" in line
    report = json.loads(result.stdout)
    assert report["outcome"] == "refused" and report["summary"]["refused"] == 1
    assert by_name(report)["scaled"]["action"] == "refused" and "max_instances 1" in by_name(report)["scaled"]["error"]
    assert by_name(report)["fine"]["action"] == "create" and not by_name(report)["fine"]["done"]
    assert echo_db(echo) == {}
    assert run_cli("apply", "-f", str(path), "--dry-run", env=echo).returncode == EXIT_PLAN_REFUSED


def test_a_bad_model_folder_is_bad_input_named_by_its_entry(project: Path, echo: dict) -> None:
    (project / "models" / "empty").mkdir()
    path = write(project, TWO + "  - name: three\n    model: models/empty\n")
    line = assert_one_line_error(run_cli("apply", "-f", str(path), env=echo), code=2, contains=f"{path}:9: endpoint three: ")
    assert "config.json" in line
    assert echo_db(echo) == {}


def test_moving_an_endpoint_to_another_provider_is_refused_before_anything_changes(project: Path, echo: dict) -> None:
    assert run_cli("deploy", str(project / "models" / "tiny"), "--provider", "echo", "--name", "one", env=echo).returncode == 0
    path = write(project, "endpoints:\n  - name: one\n    model: models/tiny\n    provider: local\n")
    line = assert_one_line_error(run_cli("apply", "-f", str(path), env=echo), code=2, contains=f"{path}:2: endpoint one runs on echo")
    assert "cloudllm delete one" in line
    assert echo_db(echo)["one"]["calls"] == ["deploy"]


def test_apply_tags_endpoints_with_the_file_id_and_never_prints_secrets(project: Path, echo: dict, cloudllm_home: Path) -> None:
    path = write(
        project,
        f"""
        file_id: shop-prod
        endpoints:
          - name: one
            model: models/tiny
            provider: echo
            options: {{hf_token: {HF_TOKEN}, note: "token={HF_TOKEN}"}}
        """,
    )
    result = run_cli("apply", "-f", str(path), "--json", env=echo)
    assert result.returncode == 0, result.stderr
    assert HF_TOKEN not in result.stdout and HF_TOKEN not in result.stderr
    record = json.loads((cloudllm_home / "endpoints" / "one.json").read_text())
    assert record["apply_file"] == "shop-prod"
    listed = run_cli("list", "--json", env=echo)
    assert HF_TOKEN not in listed.stdout


def test_python_api_apply(project: Path, echo: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudllm import api

    monkeypatch.syspath_prepend(echo["PYTHONPATH"])
    monkeypatch.setenv("ECHO_PROVIDER_DB", echo["ECHO_PROVIDER_DB"])
    path = write(project, TWO)
    result = api.apply(path)
    assert isinstance(result, ApplyResult) and result.outcome == "applied" and result.exit_code == EXIT_OK
    assert [e.spec.tags[FILE_TAG] for e in result.endpoints] == ["repo-cloudllm-yaml"] * 2
    assert api.apply(path).outcome == "no-change"


def test_outcome_and_exit_code_follow_the_worst_endpoint() -> None:
    def result(*items: EndpointResult, dry_run: bool = False) -> ApplyResult:
        return ApplyResult("f.yaml", "f", dry_run, False, list(items))

    def item(action: str, *, done: bool = True, error: str | None = None) -> EndpointResult:
        return EndpointResult("a", "echo", None, action, [], done=done, error=error)

    assert result(item("unchanged"), item("keep")).outcome == "no-change"
    assert result(item("create"), item("unchanged")).outcome == "applied"
    assert result(item("create", done=False), dry_run=True).outcome == "dry-run"
    failed = result(item("create"), item("update", done=False, error="boom"))
    assert (failed.outcome, failed.exit_code, failed.summary()["failed"]) == ("failed", EXIT_FAILED, 1)
    refused = result(item("create", done=False), item("refused", done=False, error="no fit"), dry_run=True)
    assert (refused.outcome, refused.exit_code) == ("refused", EXIT_PLAN_REFUSED)


# --- the local provider: real model servers ---------------------------------------------------------
def _local_file(project: Path, *, tokens: int = 8, with_b: bool = True) -> Path:
    text = f"endpoints:\n  - name: loc-a\n    model: models/tiny\n    serving: {{max_new_tokens: {tokens}}}\n"
    if with_b:
        text += "  - name: loc-b\n    model: models/tiny\n"
    return write(project, text)


def test_local_apply_create_no_change_update_keep_prune(project: Path, cloudllm_home: Path) -> None:
    path = _local_file(project)
    created = apply_json("-f", str(path), env={})
    assert [(e["name"], e["action"], e["state"]) for e in created["endpoints"]] == [("loc-a", "create", "InService"), ("loc-b", "create", "InService")]
    url_b = by_name(created)["loc-b"]["url"]
    assert run_cli("invoke", "loc-a", "hello", "--max-new-tokens", "2").returncode == 0

    second = run_cli("apply", "-f", str(path))
    assert second.returncode == 0 and "no change (2 endpoint(s) unchanged)" in second.stdout, second.stderr

    _local_file(project, tokens=4, with_b=False)
    edited = apply_json("-f", str(path), env={})
    assert by_name(edited)["loc-a"]["action"] == "update" and by_name(edited)["loc-a"]["state"] == "InService"
    assert by_name(edited)["loc-b"]["action"] == "keep"
    assert json.loads(run_cli("status", "loc-b", "--json").stdout)["url"] == url_b

    pruned = apply_json("-f", str(path), "--prune", env={})
    assert by_name(pruned)["loc-b"]["action"] == "delete" and by_name(pruned)["loc-b"]["done"]
    assert by_name(pruned)["loc-a"]["action"] == "unchanged"
    assert [e["name"] for e in json.loads(run_cli("list", "--json").stdout)] == ["loc-a"]
    assert not (cloudllm_home / "local" / "loc-b").exists()


@pytest.mark.slow
def test_python_api_example_runs(tiny_gpt2: Path, tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "python_api.py"
    result = subprocess.run(
        [sys.executable, str(example), str(tiny_gpt2)], capture_output=True, text=True, timeout=600, env={**os.environ}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "deleted" in result.stdout
    answer = next(line for line in result.stdout.splitlines() if line.startswith("answer: "))
    assert answer != "answer: " and not answer.startswith("answer: [")  # cloudllm.invoke returns the text, not the response list


# --- a CI runner with no records: ownership by tag, on the SageMaker emulator ------------------------
@pytest.mark.slow
def test_prune_from_a_fresh_machine_finds_the_files_endpoints_by_tag(sagemaker_emulator, project: Path, tmp_path: Path) -> None:
    common = f"    provider: sagemaker\n    model: models/tiny\n    runtime: handler\n    instance: ml.m5.xlarge\n    bucket: {sagemaker_emulator.bucket}/models\n    options: {{role: {sagemaker_emulator.role}}}\n"
    path = write(project, f"file_id: remote-test\nendpoints:\n  - name: sm-a\n{common}  - name: sm-b\n{common}")
    assert apply_json("-f", str(path), env={})["summary"]["create"] == 2
    details = json.loads(run_cli("status", "sm-b", "--json").stdout)["details"]
    assert details["tags"][FILE_TAG] == "remote-test"  # what a runner with no records goes by
    manual = run_cli(
        "deploy", str(project / "models" / "tiny"), "--name", "sm-manual", "--provider", "sagemaker", "--runtime", "handler",
        "--instance", "ml.m5.xlarge", "--bucket", f"{sagemaker_emulator.bucket}/models", "--role", sagemaker_emulator.role,
    )  # fmt: skip
    assert manual.returncode == 0, manual.stderr

    fresh = {"CLOUDLLM_HOME": str(tmp_path / "fresh-runner")}  # no records: only the tags say who owns what
    write(project, f"file_id: remote-test\nendpoints:\n  - name: sm-a\n{common}")
    pruned = apply_json("-f", str(path), "--prune", env=fresh)
    assert by_name(pruned)["sm-b"]["action"] == "delete" and by_name(pruned)["sm-b"]["done"]
    assert "sm-manual" not in by_name(pruned)
    names = [e["name"] for e in json.loads(run_cli("list", "--provider", "sagemaker", "--json", env=fresh).stdout)]
    assert names == ["sm-a", "sm-manual"]


# --- the same on the Vertex AI emulator: the file's endpoints carry it as a label ------------------------
def test_vertex_prune_from_a_fresh_machine_finds_the_files_endpoints_by_label(vertex_emulator, project: Path, tmp_path: Path) -> None:
    vertex_emulator.serve_engine_images = False  # the TGI deployments need no model server: this is about ownership
    common = f"    provider: vertex\n    model: models/tiny\n    runtime: tgi\n    instance: g2-standard-8\n    bucket: {vertex_emulator.bucket}\n"
    path = write(project, f"file_id: remote-test\nendpoints:\n  - name: vx-a\n{common}  - name: vx-b\n{common}")
    try:
        assert apply_json("-f", str(path), env={})["summary"]["create"] == 2
        details = json.loads(run_cli("status", "vx-b", "--json").stdout)["details"]
        assert details["labels"][FILE_TAG] == "remote-test"
        manual = run_cli(
            "deploy", str(project / "models" / "tiny"), "--name", "vx-manual", "--provider", "vertex", "--runtime", "tgi",
            "--instance", "g2-standard-8", "--bucket", vertex_emulator.bucket,
        )  # fmt: skip
        assert manual.returncode == 0, manual.stderr

        fresh = {"CLOUDLLM_HOME": str(tmp_path / "fresh-runner")}  # no records: only the labels say who owns what
        write(project, f"file_id: remote-test\nendpoints:\n  - name: vx-a\n{common}")
        pruned = apply_json("-f", str(path), "--prune", env=fresh)
        assert by_name(pruned)["vx-b"]["action"] == "delete" and by_name(pruned)["vx-b"]["done"]
        assert by_name(pruned)["vx-a"]["action"] == "unchanged" and "vx-manual" not in by_name(pruned)
        names = [e["name"] for e in json.loads(run_cli("list", "--provider", "vertex", "--json", env=fresh).stdout)]
        assert sorted(names) == ["vx-a", "vx-manual"]
    finally:
        for name in ("vx-a", "vx-b", "vx-manual"):
            run_cli("delete", name, "--provider", "vertex", "--purge-artifacts")
        vertex_emulator.serve_engine_images = True


@pytest.mark.slow
def test_adopting_a_deployed_endpoint_names_the_tag_it_adds(sagemaker_emulator, project: Path) -> None:
    """`apply` over an endpoint `deploy` made: the reason names what changed (the file's tag), and the tag is added in place."""
    flags = ["--provider", "sagemaker", "--runtime", "handler", "--instance", "ml.m5.xlarge",
             "--bucket", f"{sagemaker_emulator.bucket}/models", "--role", sagemaker_emulator.role]  # fmt: skip
    made = run_cli("deploy", str(project / "models" / "tiny"), "--name", "sm-adopt", "--tag", "team=a", *flags)
    assert made.returncode == 0, made.stderr
    retagged = run_cli("deploy", str(project / "models" / "tiny"), "--name", "sm-adopt", "--tag", "team=b", "--dry-run", "--json", *flags)
    assert "tags changed (team a -> b)" in json.loads(retagged.stdout)["reasons"], retagged.stdout
    common = f"    provider: sagemaker\n    model: models/tiny\n    runtime: handler\n    instance: ml.m5.xlarge\n    bucket: {sagemaker_emulator.bucket}/models\n    tags: {{team: a}}\n    options: {{role: {sagemaker_emulator.role}}}\n"
    path = write(project, f"file_id: adopt\nendpoints:\n  - name: sm-adopt\n{common}")
    planned = apply_json("-f", str(path), "--dry-run", env={})
    reasons = by_name(planned)["sm-adopt"]["reasons"]
    assert reasons == [f"tags changed (+{FILE_TAG})"], reasons  # the model reached through another path is the same model
    before = json.loads(run_cli("status", "sm-adopt", "--json").stdout)["details"]["endpoint_config"]
    adopted = apply_json("-f", str(path), env={})
    assert by_name(adopted)["sm-adopt"]["done"] and by_name(adopted)["sm-adopt"]["changes"][0]["reason"].startswith("tags only, in place")
    after = json.loads(run_cli("status", "sm-adopt", "--json").stdout)["details"]
    assert after["endpoint_config"] == before and after["tags"] == {"team": "a", FILE_TAG: "adopt"}  # retagged, not redeployed
    assert by_name(apply_json("-f", str(path), "--dry-run", env={}))["sm-adopt"]["action"] == "unchanged"
    assert run_cli("delete", "sm-adopt", "--yes").returncode == 0
