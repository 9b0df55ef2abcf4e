"""The local provider end to end, through the real CLI in subprocesses and real HTTP on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cloudllm.providers.kit.server import alive
from cloudllm.testing import eventually
from tests.conftest import CLOUDLLM, assert_one_line_error, run_cli, shared_local_home


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLOUDLLM_HOME for the module, so one deployed endpoint serves several tests."""
    yield from shared_local_home(tmp_path_factory)


@pytest.fixture(scope="module")
def demo(home: dict, tiny_gpt2: Path) -> dict:
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "demo", "--json", env=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _pings(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ping").status_code == 200
    except httpx.TransportError:
        return False


def _state(home: dict, name: str) -> dict:
    return json.loads((Path(home["CLOUDLLM_HOME"]) / "local" / name / "state.json").read_text())


def test_deploy_reports_a_healthy_endpoint(demo: dict) -> None:
    assert demo["action"] == "create"
    endpoint = demo["endpoint"]
    assert endpoint["state"] == "InService" and endpoint["url"].startswith("http://127.0.0.1:")
    assert httpx.get(endpoint["url"] + "/ping").status_code == 200


def test_invoke_text_stream_and_json(demo: dict, home: dict) -> None:
    text = run_cli("invoke", "demo", "Once upon a time", "--max-new-tokens", "12", env=home)
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip()

    streamed = run_cli("invoke", "demo", "Once upon a time", "--max-new-tokens", "12", "--stream", env=home)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == text.stdout  # greedy decoding: the stream adds up to the same text

    body = json.dumps({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 12}})
    raw = run_cli("invoke", "demo", "--body", body, "--raw", env=home)
    assert json.loads(raw.stdout) == [{"generated_text": text.stdout.rstrip("\n")}]


def test_invoke_of_a_local_endpoint_imports_no_pydantic_httpx_or_rich(demo: dict, home: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cloudllm invoke` answers a local endpoint on the standard library (BENCHMARKS.md times it against curl);
    its answer and its errors are the full path's."""
    code = (
        "import sys\n"
        "from cloudllm.cli import main\n"
        "try:\n"
        "    main(['invoke', 'demo', 'Once upon a time', '--max-new-tokens', '12'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'httpx', 'rich', 'torch', 'boto3'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **home})
    assert result.returncode == 0, result.stderr
    *answer, imported = result.stdout.strip().splitlines()
    assert imported == "[]"
    from cloudllm import api

    monkeypatch.setenv("CLOUDLLM_HOME", home["CLOUDLLM_HOME"])
    assert answer and "\n".join(answer) == api.invoke("demo", "Once upon a time", parameters={"max_new_tokens": 12}).strip()

    refused = run_cli("invoke", "demo", "--body", '{"inputs": "Hi", "parameters": {"max_new_tokens": -1}}', env=home)
    assert_one_line_error(refused, code=2, contains="rejected the request (4")


def test_list_and_status(demo: dict, home: dict) -> None:
    listed = json.loads(run_cli("list", "--json", env=home).stdout)
    assert [(e["name"], e["provider"], e["state"]) for e in listed] == [("demo", "local", "InService")]
    status = run_cli("status", "demo", env=home)
    assert "InService" in status.stdout and demo["endpoint"]["url"] in status.stdout
    table = run_cli("list", env=home).stdout
    assert table.splitlines()[0].split() == ["NAME", "PROVIDER", "STATE", "MODEL", "URL"]


def test_logs_print_the_servers_json_lines_and_since_filters_by_time(demo: dict, home: dict) -> None:
    assert run_cli("invoke", "demo", "a secret prompt", "--max-new-tokens", "2", env=home).returncode == 0
    everything = run_cli("logs", "demo", env=home)
    assert everything.returncode == 0, everything.stderr
    records = [json.loads(line) for line in everything.stdout.splitlines() if line.startswith("{")]
    assert {"listening", "model_loaded", "request"} <= {r["event"] for r in records}
    assert "a secret prompt" not in everything.stdout  # prompts stay out of the log unless --log-payloads

    recent = run_cli("logs", "demo", "--since", "1h", env=home)
    assert recent.returncode == 0 and recent.stdout == everything.stdout
    future = run_cli("logs", "demo", "--since", "2099-01-01T00:00:00Z", env=home)
    assert future.returncode == 0 and future.stdout == ""
    last = records[-1]["ts"]
    tail = run_cli("logs", "demo", "--since", last, env=home)
    assert tail.stdout and all(json.loads(line)["ts"] >= last for line in tail.stdout.splitlines() if line.startswith("{"))
    as_json = [json.loads(line) for line in run_cli("logs", "demo", "--json", env=home).stdout.splitlines()]
    assert [r["line"] for r in as_json] == everything.stdout.splitlines()  # JSON Lines, one per log line
    assert {r["name"] for r in as_json} == {"demo"} and [r["record"] for r in as_json if r["record"]] == records


def test_unchanged_redeploy_does_nothing(demo: dict, home: dict, tiny_gpt2: Path) -> None:
    before = _state(home, "demo")
    again = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "demo", env=home)
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    assert _state(home, "demo")["pid"] == before["pid"]


def test_a_tags_change_alone_is_recorded_and_the_server_keeps_running(demo: dict, home: dict, tiny_gpt2: Path) -> None:
    before = _state(home, "demo")
    planned = run_cli("plan", str(tiny_gpt2), "--provider", "local", "--name", "demo", "--tag", "team=a", env=home)
    assert planned.returncode == 0, planned.stderr
    assert "tags only, in place" in planned.stdout and "tags changed (+team)" in planned.stdout
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "demo", "--tag", "team=a", "--json", env=home)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reasons"] == ["tags changed (+team)"]
    after = _state(home, "demo")
    assert (after["pid"], after["url"], after["version"]) == (before["pid"], before["url"], before["version"]) and after["tags"] == {"team": "a"}
    assert _pings(int(after["url"].rsplit(":", 1)[1]))
    again = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "demo", "--tag", "team=a", env=home)
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stderr


def test_changed_deploy_switches_then_stops_the_old_server(demo: dict, home: dict, tiny_gpt2: Path) -> None:
    old = _state(home, "demo")
    result = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "demo", "--max-new-tokens", "40", "--json", env=home)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["action"] == "update" and "code or serving settings changed" in out["reasons"]
    new = _state(home, "demo")
    assert new["pid"] != old["pid"] and new["url"] != old["url"]
    with pytest.raises(httpx.TransportError):
        httpx.get(old["url"] + "/ping", timeout=2)
    assert not Path(old["artifact"]).exists()
    over_cap = run_cli("invoke", "demo", "hi", "--max-new-tokens", "41", env=home)
    assert_one_line_error(over_cap, code=2, contains="max_new_tokens")


def test_bad_request_bodies_are_4xx_one_line(demo: dict, home: dict) -> None:
    assert_one_line_error(run_cli("invoke", "demo", "--body", "{nope", env=home), code=2, contains="not valid JSON")
    assert_one_line_error(run_cli("invoke", "demo", "--body", '{"parameters": {}}', env=home), code=2, contains="rejected")
    assert_one_line_error(
        run_cli("invoke", "demo", "--body", '{"inputs": 5}', env=home), code=2, contains="rejected"
    )
    assert run_cli("invoke", "demo", "still alive?", "--max-new-tokens", "2", env=home).returncode == 0


def test_unknown_and_invalid_names(home: dict) -> None:
    assert_one_line_error(run_cli("invoke", "ghost", "hi", env=home), code=2, contains="no endpoint named 'ghost'")
    assert_one_line_error(run_cli("delete", "ghost", env=home), code=2, contains="no endpoint named 'ghost'")
    assert_one_line_error(run_cli("status", "bad_name", env=home), code=2, contains="invalid endpoint name")


def test_died_server_is_reported_then_redeploy_recovers(home: dict, tiny_gpt2: Path) -> None:
    deployed = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "fragile", env=home)
    assert deployed.returncode == 0, deployed.stderr
    state = _state(home, "fragile")
    pid = state["pid"]
    os.killpg(pid, signal.SIGKILL)
    eventually(lambda: not alive(pid, str(Path(state["artifact"]) / "code" / "serve.py")), what=f"server {pid} gone")
    assert_one_line_error(run_cli("invoke", "fragile", "hi", env=home), code=1, contains="is not running")
    assert "Failed" in run_cli("status", "fragile", env=home).stdout
    redeployed = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "fragile", "--json", env=home)
    assert json.loads(redeployed.stdout)["action"] == "update"
    assert run_cli("invoke", "fragile", "hi", "--max-new-tokens", "2", env=home).returncode == 0
    assert run_cli("delete", "fragile", env=home).returncode == 0
    assert not (Path(home["CLOUDLLM_HOME"]) / "local" / "fragile").exists()


def test_delete_stops_the_server(home: dict, tiny_gpt2: Path) -> None:
    assert run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "shortlived", env=home).returncode == 0
    state = _state(home, "shortlived")
    assert run_cli("delete", "shortlived", env=home).returncode == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(state["url"] + "/ping", timeout=2)
    names = [e["name"] for e in json.loads(run_cli("list", "--json", env=home).stdout)]
    assert "shortlived" not in names


def test_deploy_bad_inputs_create_nothing(home: dict, tiny_gpt2: Path, tmp_path: Path) -> None:
    cases = [
        (["deploy", str(tmp_path / "missing")], 2, "does not exist"),
        (["deploy", str(tmp_path)], 2, "no config.json"),
        (["deploy", str(tiny_gpt2), "--task", "painting"], 2, "unknown task"),
        (["deploy", str(tiny_gpt2), "--provider", "nosuch"], 2, "unknown provider"),
        (["deploy", str(tiny_gpt2), "--name", "-bad-"], 2, "invalid endpoint name"),
        (["deploy", str(tiny_gpt2), "--instance", "ml.g5.xlarge"], 3, "not available on the local provider"),
        (["deploy", str(tiny_gpt2), "--max-instances", "3"], 3, "autoscaling"),
        (["deploy", str(tiny_gpt2), "--min-instances", "2", "--max-instances", "1"], 2, "above max_instances"),
        (["deploy", str(tiny_gpt2), "--bogus-flag"], 2, "no such option"),
    ]
    before = sorted(p.name for p in (Path(home["CLOUDLLM_HOME"]) / "local").iterdir())
    for args, code, message in cases:
        assert_one_line_error(run_cli(*args, "--name", "never", env=home) if "--name" not in args else run_cli(*args, env=home), code=code, contains=message)
    after = sorted(p.name for p in (Path(home["CLOUDLLM_HOME"]) / "local").iterdir())
    assert after == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_the_artifact_like_a_container(tiny_gpt2: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    assert run_cli("package", str(tiny_gpt2), "-o", str(artifact)).returncode == 0
    port = _free_port()
    server = subprocess.Popen([CLOUDLLM, "serve", str(artifact), "--port", str(port), "--host", "127.0.0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        eventually(lambda: _pings(port), what=f"the server on port {port} answering /ping")
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert answer.status_code == 200 and "generated_text" in answer.json()[0]

        busy = run_cli("serve", str(artifact), "--port", str(port), "--host", "127.0.0.1", timeout=120)
        assert busy.returncode != 0 and "in use" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        server.terminate()
        server.wait(30)


def test_serve_refuses_a_folder_that_is_not_an_artifact(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("serve", str(tmp_path)), code=2, contains="not a cloudllm artifact")


# --- a server that cannot load its model, --no-wait updates, orphaned records ------------------------


@pytest.fixture(scope="module")
def broken_gpt2(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with a config.json whose sizes disagree with its weights: it passes inspect, then fails to load."""
    folder = tmp_path_factory.mktemp("broken") / "gpt2"
    shutil.copytree(tiny_gpt2, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _servers_under(path: Path) -> list[int]:
    """Live processes (not zombies) whose command line runs something under path: our model servers."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(path) in text and "serve.py" in text:
            pids.append(int(cmdline.parent.name))
    return pids


def _error_line(result: subprocess.CompletedProcess) -> str:
    """A failed deploy: progress lines, then exactly one error line last, no traceback and no "done"."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors and errors == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr and "done in" not in result.stderr
    return errors[0]


def test_a_model_that_fails_to_load_fails_the_deploy_at_once(home: dict, broken_gpt2: Path) -> None:
    root = Path(home["CLOUDLLM_HOME"])
    # Waiting out --timeout would end in "did not become healthy"; the failure must come from /ping.
    result = run_cli("deploy", str(broken_gpt2), "--provider", "local", "--name", "broken", "--timeout", "120", env=home)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = _error_line(result)
    assert "the model failed to load" in line and "mismatch" in line, line
    log = Path(line.rsplit("see the full log in ", 1)[1].rstrip("."))
    assert "model_load_failed" in {json.loads(r).get("event") for r in log.read_text().splitlines() if r.startswith("{")}
    # Nothing left running or recorded.
    assert not (root / "local" / "broken").exists()
    assert not (root / "endpoints" / "broken.json").exists()
    assert "broken" not in [e["name"] for e in json.loads(run_cli("list", "--json", env=home).stdout)]
    assert _servers_under(root / "local" / "broken") == []


def test_no_wait_update_switches_only_to_a_healthy_server(home: dict, tiny_gpt2: Path, broken_gpt2: Path) -> None:
    root = Path(home["CLOUDLLM_HOME"])
    first = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "steady", env=home)
    assert first.returncode == 0, first.stderr
    old = _state(home, "steady")

    # A good change: --no-wait still returns only once the new server answers, and the old one is gone.
    no_wait = ("--provider", "local", "--name", "steady", "--no-wait")
    changed = run_cli("deploy", str(tiny_gpt2), *no_wait, "--max-new-tokens", "40", "--json", env=home)
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["action"] == "update"
    new = _state(home, "steady")
    assert new["pid"] != old["pid"]
    assert httpx.get(new["url"] + "/ping", timeout=5).status_code == 200
    assert _servers_under(Path(old["artifact"])) == [] and not Path(old["artifact"]).exists()

    # A change whose model cannot load: the update fails and the live server keeps serving, untouched.
    failed = run_cli("deploy", str(broken_gpt2), *no_wait, env=home)
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert "the model failed to load" in _error_line(failed)
    assert _state(home, "steady") == new
    assert httpx.get(new["url"] + "/ping", timeout=5).status_code == 200
    assert run_cli("invoke", "steady", "still here?", "--max-new-tokens", "2", env=home).returncode == 0
    assert [p.name for p in (root / "local" / "steady").iterdir() if p.is_dir()] == [new["version"]]
    assert _servers_under(root / "local" / "steady") == [new["pid"]]
    assert run_cli("delete", "steady", env=home).returncode == 0


def test_delete_forgets_an_endpoint_whose_local_state_is_gone(home: dict, tiny_gpt2: Path) -> None:
    from cloudllm.records import EndpointRecord

    root = Path(home["CLOUDLLM_HOME"])
    # What a deploy leaves after someone cleans out $CLOUDLLM_HOME/local: its record, and no server state.
    record = EndpointRecord(name="orphan", provider="local", model=str(tiny_gpt2), url="http://127.0.0.1:9")
    (root / "endpoints").mkdir(parents=True, exist_ok=True)
    (root / "endpoints" / "orphan.json").write_text(record.model_dump_json())
    listed = {e["name"]: e["state"] for e in json.loads(run_cli("list", "--json", env=home).stdout)}
    assert listed["orphan"] == "Missing"

    deleted = run_cli("delete", "orphan", env=home)
    assert deleted.returncode == 0, deleted.stderr
    assert not (root / "endpoints" / "orphan.json").exists()
    assert "orphan" not in [e["name"] for e in json.loads(run_cli("list", "--json", env=home).stdout)]
    assert_one_line_error(run_cli("delete", "orphan", env=home), code=2, contains="no endpoint named 'orphan'")
    assert_one_line_error(run_cli("delete", "orphan", "--provider", "local", env=home), code=2, contains="no local endpoint named 'orphan'")


def test_no_wait_create_of_a_model_that_fails_to_load_reports_failed(home: dict, broken_gpt2: Path) -> None:
    root = Path(home["CLOUDLLM_HOME"])
    created = run_cli("deploy", str(broken_gpt2), "--provider", "local", "--name", "doomed", "--no-wait", env=home)
    assert created.returncode == 0, created.stderr  # --no-wait on a create returns once the server has a port
    endpoint = eventually(  # until the server has tried to load its model
        lambda: (found := json.loads(run_cli("status", "doomed", "--json", env=home).stdout))["state"] != "Loading" and found,
        what="the server trying to load its model",
    )
    assert endpoint["state"] == "Failed" and "the model failed to load" in endpoint["failure_reason"], endpoint
    assert run_cli("delete", "doomed", env=home).returncode == 0
    assert _servers_under(root / "local" / "doomed") == [] and not (root / "local" / "doomed").exists()


# --- interrupted deploys, damaged state, frozen servers (issue 14) ------------------------------------
def _started_server(home: dict, name: str) -> dict:
    """The server a deploy records in its version folder before the model loads (waits until it is there)."""
    root = Path(home["CLOUDLLM_HOME"]) / "local" / name

    def recorded() -> dict | None:
        found = list(root.glob("*/server.json"))
        return json.loads(found[0].read_text()) if found and found[0].read_text().strip() else None

    return eventually(recorded, what=f"{name}'s server.json")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie is not running


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_deploy_killed_while_the_model_loads_leaves_a_record_that_delete_cleans_up(home: dict, tiny_gpt2: Path, signum: int) -> None:
    name = f"killed-{signum}"
    deploy = subprocess.Popen([CLOUDLLM, "deploy", str(tiny_gpt2), "--provider", "local", "--name", name],
                              env={**os.environ, **home}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    server = _started_server(home, name)
    deploy.send_signal(signum)
    _, err = deploy.communicate(timeout=120)
    if signum == signal.SIGTERM:  # unwinds like Ctrl-C: the half-started server is stopped, and it says what to do
        assert "cloudllm delete" in err and not _running(server["pid"]), err
    listed = run_cli("list", "--json", env=home)
    endpoint = next(e for e in json.loads(listed.stdout) if e["name"] == name)
    assert endpoint["state"] == "Incomplete" and f"cloudllm delete {name}" in endpoint["failure_reason"]
    deleted = run_cli("delete", name, env=home)
    assert deleted.returncode == 0, deleted.stderr
    assert not _running(server["pid"])
    assert name not in run_cli("list", env=home).stdout


def test_damaged_state_is_named_and_only_a_provably_ours_process_is_signalled(home: dict, tiny_gpt2: Path) -> None:
    assert run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "damaged", env=home).returncode == 0
    ours = _state(home, "damaged")["pid"]
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)  # a process that reused a pid, as far as state says
    try:
        state_file = Path(home["CLOUDLLM_HOME"]) / "local" / "damaged" / "state.json"
        state_file.write_text(json.dumps({**_state(home, "damaged"), "pid": stranger.pid}))
        status = run_cli("status", "damaged", "--json", env=home)
        assert json.loads(status.stdout)["state"] == "Failed"  # not "our server": a pid alone proves nothing

        state_file.write_text("{half a file")
        listed = run_cli("list", env=home)
        assert listed.returncode == 0 and "Unknown" in listed.stdout and str(state_file) in listed.stdout
        assert_one_line_error(run_cli("invoke", "damaged", "hi", env=home), code=2, contains=str(state_file))

        deleted = run_cli("delete", "damaged", env=home)
        assert deleted.returncode == 0, deleted.stderr
        assert not _running(ours)  # found through its own server.json, its command line checked
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_a_damaged_record_never_hides_the_other_endpoints(demo: dict, home: dict) -> None:
    bad = Path(home["CLOUDLLM_HOME"]) / "endpoints" / "garbled.json"
    bad.write_text('{"name": "garbled", "provider": 5}')
    try:
        listed = run_cli("list", env=home)
        assert listed.returncode == 0 and "demo" in listed.stdout
        assert str(bad) in listed.stderr and "Traceback" not in listed.stderr
        assert_one_line_error(run_cli("status", "garbled", env=home), code=2, contains=str(bad))
    finally:
        bad.unlink()


def test_records_are_private_to_their_owner(demo: dict, home: dict) -> None:
    folder = Path(home["CLOUDLLM_HOME"]) / "endpoints"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "demo.json").stat().st_mode & 0o777 == 0o600


def test_a_frozen_server_times_out_invoke_and_status_says_it_does_not_answer(home: dict, tiny_gpt2: Path) -> None:
    assert run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "frozen", env=home).returncode == 0
    pid = _state(home, "frozen")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert_one_line_error(run_cli("invoke", "frozen", "hi", "--timeout", "1", env=home), code=1, contains="did not answer within 1s")
        status = json.loads(run_cli("status", "frozen", "--json", env=home).stdout)
        assert status["state"] == "NotResponding" and "does not answer" in status["failure_reason"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert run_cli("invoke", "frozen", "hi", "--max-new-tokens", "2", env=home).returncode == 0
    log = Path(_state(home, "frozen")["log"])
    log.unlink()  # a user tidying up
    assert_one_line_error(run_cli("logs", "frozen", env=home), code=2, contains=str(log))
    assert run_cli("delete", "frozen", env=home).returncode == 0


def test_an_update_keeps_the_url_clients_saved(home: dict, tiny_gpt2: Path) -> None:
    first = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "steady", "--json", env=home)
    assert first.returncode == 0, first.stderr
    saved = json.loads(first.stdout)["endpoint"]["url"]
    old_server = _state(home, "steady")["url"]
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3}}
    assert httpx.post(saved + "/invocations", json=body, timeout=60).status_code == 200

    second = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "steady", "--max-new-tokens", "2", "--json", env=home)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["endpoint"]["url"] == saved and _state(home, "steady")["url"] != old_server
    with pytest.raises(httpx.TransportError):
        httpx.get(old_server + "/ping", timeout=2)  # the old server is gone; the saved URL reaches the new one
    answered = httpx.post(saved + "/invocations", json=body, timeout=60)
    assert answered.status_code == 422 and "max_new_tokens" in answered.text  # the new version's cap of 2
    assert run_cli("delete", "steady", env=home).returncode == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(saved + "/ping", timeout=2)


def test_the_server_ignores_our_and_the_platforms_variables_in_the_users_shell(home: dict, tiny_gpt2: Path) -> None:
    """A $CLOUDLLM_SETTINGS (or AIP_*/SM_* of a container being developed) in the shell must not steer the local server."""
    shell = {**home, "CLOUDLLM_SETTINGS": "{not json", "AIP_PREDICT_ROUTE": "/elsewhere", "AIP_DEPLOYED_MODEL_ID": "7", "SM_MODEL_DIR": "/nowhere"}
    deployed = run_cli("deploy", str(tiny_gpt2), "--provider", "local", "--name", "clean-env", env=shell)
    assert deployed.returncode == 0, deployed.stderr
    try:
        environ = Path(f"/proc/{_state(home, 'clean-env')['pid']}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"CLOUDLLM_", b"AIP_", b"SM_"))]
        answer = run_cli("invoke", "clean-env", "hi", "--max-new-tokens", "3", "--raw", env=shell)
        assert answer.returncode == 0, answer.stderr
        assert "deployed_model_id" not in answer.stdout  # the Vertex shape only where Vertex runs it
    finally:
        assert run_cli("delete", "clean-env", "--yes", env=home).returncode == 0
