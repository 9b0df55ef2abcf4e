"""cloudllm iam-policy: the policy allows every AWS call the tool makes, and nothing it does not need.

The calls are read from the source (boto3 client methods, paginator names, the transfer
manager's uploads and copies) and mapped to IAM actions through botocore's service models,
independently of cloudllm/iam.py's own table.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path

import pytest

from cloudllm import iam
from tests.conftest import assert_one_line_error, run_cli

PACKAGE = Path(__file__).parent.parent / "cloudllm"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExec"
KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"

# S3 operations whose IAM action is not named after them (AWS S3 user guide, "Actions, resources
# and condition keys for Amazon S3"). Multipart parts are authorised as PutObject.
S3_ACTIONS = {
    "HeadBucket": {"s3:ListBucket"},
    "ListObjectsV2": {"s3:ListBucket"},
    "ListObjects": {"s3:ListBucket"},
    "HeadObject": {"s3:GetObject"},
    "GetObject": {"s3:GetObject"},
    "PutObject": {"s3:PutObject"},
    "CreateMultipartUpload": {"s3:PutObject"},
    "UploadPart": {"s3:PutObject"},
    "CompleteMultipartUpload": {"s3:PutObject"},
    "AbortMultipartUpload": {"s3:AbortMultipartUpload"},
    "ListParts": {"s3:ListMultipartUploadParts"},
    "ListMultipartUploads": {"s3:ListBucketMultipartUploads"},
    "CopyObject": {"s3:GetObject", "s3:PutObject"},
    "UploadPartCopy": {"s3:GetObject", "s3:PutObject"},
    "DeleteObject": {"s3:DeleteObject"},
    "DeleteObjects": {"s3:DeleteObject"},
    "GetBucketLocation": {"s3:GetBucketLocation"},
}
# Calls boto3's transfer manager makes behind manager.upload(...) / manager.copy(...).
TRANSFER_CALLS = {
    "upload": {"PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload"},
    "copy": {"HeadObject", "CopyObject", "CreateMultipartUpload", "UploadPartCopy", "CompleteMultipartUpload", "AbortMultipartUpload"},
}
NO_PERMISSION = {"sts:GetCallerIdentity"}  # answered for any valid credentials


def aws_sources() -> list[Path]:
    """The deploy-time modules that talk to AWS (not the emulators, not the test plugin, not iam.py)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        if rel[0] in ("emulators", "testing") or rel == ("iam.py",):
            continue
        text = path.read_text()
        if "boto3" in text or "botocore" in text or re.search(r"client\(\s*[\"'](s3|sagemaker)", text):
            found.append(path)
    return found


@cache
def operations_of(service: str) -> dict[str, str]:
    """boto3 method name -> API operation name, from botocore's service model."""
    import botocore.session
    from botocore import xform_name

    model = botocore.session.get_session().get_service_model(service)
    return {xform_name(op): op for op in model.operation_names}


@cache
def signing_name(service: str) -> str:
    import botocore.session

    return botocore.session.get_session().get_service_model(service).signing_name


def scan_calls() -> tuple[set[str], dict[str, set[str]]]:
    """('client:Operation' calls the sources make, {call: files}); clients are those the sources create."""
    texts = {p: p.read_text() for p in aws_sources()}
    clients = {"s3"} | {m for text in texts.values() for m in re.findall(r"client\(\s*[\"']([a-z0-9\-]+)[\"']", text)}
    calls: set[str] = set()
    where: dict[str, set[str]] = {}
    for path, text in texts.items():
        names = set(re.findall(r"\.([a-z][a-z0-9_]*)\(", text)) | set(re.findall(r"[\"']([a-z][a-z0-9_]*)[\"']", text))
        found = {f"{svc}:{operations_of(svc)[n]}" for n in names for svc in clients if n in operations_of(svc)}
        if "create_transfer_manager" in text or "upload_file" in text:
            for helper, ops in TRANSFER_CALLS.items():
                if re.search(rf"\.{helper}\(", text):
                    found |= {f"s3:{op}" for op in ops}
        for call in found:
            where.setdefault(call, set()).add(str(path.relative_to(PACKAGE)))
        calls |= found
    return calls, where


def iam_actions(call: str) -> set[str]:
    service, op = call.split(":")
    if service == "s3":
        return S3_ACTIONS[op]
    if call == "sagemaker-runtime:InvokeEndpointWithResponseStream":
        return {"sagemaker:InvokeEndpoint"}  # the API reference: authorised by sagemaker:InvokeEndpoint
    if service == "cloudwatch":
        return {f"cloudwatch:{op}"}  # IAM's prefix, not the signing name (monitoring)
    return {f"{signing_name(service)}:{op}"}


def allowed(policy: dict, action: str) -> list[dict]:
    return [s for s in policy["Statement"] if s["Effect"] == "Allow" and any(fnmatchcase(action, a) for a in _list(s["Action"]))]


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


@pytest.fixture(scope="module")
def scanned() -> tuple[set[str], dict[str, set[str]]]:
    if not (PACKAGE / "providers" / "sagemaker").exists() and not list((PACKAGE / "providers").glob("sagemaker*.py")):
        pytest.skip("no SageMaker provider in cloudllm/providers yet: nothing to check the policy against")
    calls, where = scan_calls()
    assert len(calls) >= 15, f"the scan found too few AWS calls to mean anything: {sorted(calls)}"
    return calls, where


def full_policy() -> dict:
    return iam.sagemaker_policy(iam.aws_scope(region="us-east-1", buckets=["s3://models-bucket/cloudllm"], roles=[ROLE], kms_keys=[KEY]))


def test_every_call_the_tool_makes_is_declared_and_allowed(scanned) -> None:
    calls, where = scanned
    undeclared = sorted(calls - iam.OPERATIONS - NO_PERMISSION)
    assert not undeclared, f"add these calls to cloudllm/iam.py OPERATIONS (and a Permission): {[(c, sorted(where[c])) for c in undeclared]}"
    policy = full_policy()
    missing = sorted((call, action) for call in calls - NO_PERMISSION for action in iam_actions(call) if not allowed(policy, action))
    assert not missing, f"the policy does not allow: {missing}"


def test_the_policy_grants_nothing_the_tool_does_not_call(scanned) -> None:
    calls, _ = scanned
    unused = sorted(iam.OPERATIONS - calls)
    assert not unused, f"cloudllm/iam.py declares calls no source makes (remove them): {unused}"

    needed = {action for call in calls - NO_PERMISSION for action in iam_actions(call)}
    text = "\n".join(p.read_text() for p in aws_sources())
    # Checked by AWS beside the called operation; each only when the call that triggers it is made.
    justified = {
        "sagemaker:AddTags": "sagemaker:CreateModel" in calls and "Tags" in text,
        "iam:PassRole": "sagemaker:CreateModel" in calls and "ExecutionRoleArn" in text,
        "iam:CreateServiceLinkedRole": "application-autoscaling:RegisterScalableTarget" in calls,
        "sagemaker:UpdateEndpointWeightsAndCapacities": "application-autoscaling:RegisterScalableTarget" in calls,
        "sagemaker:UpdateInferenceComponentRuntimeConfig": "application-autoscaling:RegisterScalableTarget" in calls and "inference-component" in text,
        "cloudwatch:PutMetricAlarm": "application-autoscaling:PutScalingPolicy" in calls and "TargetTracking" in text,
        "cloudwatch:DeleteAlarms": "application-autoscaling:DeleteScalingPolicy" in calls,
        "cloudwatch:DescribeAlarms": "application-autoscaling:PutScalingPolicy" in calls,
        "kms:GenerateDataKey": "aws:kms" in text,
        "kms:Decrypt": "aws:kms" in text,
        "kms:CreateGrant": "KmsKeyId" in text,
        "kms:DescribeKey": "KmsKeyId" in text,
        # The push itself speaks the registry API (skopeo / the builder) with the login's token.
        **{f"ecr:{op}": "ecr:GetAuthorizationToken" in calls for op in (
            "BatchCheckLayerAvailability", "InitiateLayerUpload", "UploadLayerPart", "CompleteLayerUpload", "PutImage", "BatchGetImage")},
    }
    granted = {a for s in full_policy()["Statement"] for a in _list(s["Action"])}
    beyond = sorted(a for a in granted if a not in needed and not justified.get(a))
    assert not beyond, f"the policy allows actions no call needs: {beyond}"


def test_every_action_is_a_real_iam_action() -> None:
    services = {"sagemaker": "sagemaker", "application-autoscaling": "application-autoscaling", "iam": "iam",
                "cloudwatch": "cloudwatch", "logs": "logs", "kms": "kms", "ecr": "ecr"}  # fmt: skip
    not_operations = {"iam:PassRole", "s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:ListMultipartUploadParts"}
    s3_actions = {a for actions in S3_ACTIONS.values() for a in actions}
    for permission in iam.PERMISSIONS:
        for action in permission.actions:
            prefix, name = action.split(":")
            assert "*" not in action, action
            if action in not_operations or prefix == "s3":
                assert action in not_operations | s3_actions, action
            else:
                operations = set(operations_of(services[prefix]).values())
                if prefix == "sagemaker":
                    operations |= set(operations_of("sagemaker-runtime").values())
                assert name in operations, f"{action} is not an operation of {prefix}"


def test_resources_are_narrow_and_passrole_is_conditional() -> None:
    policy = full_policy()
    assert policy["Version"] == "2012-10-17"
    sids = [s["Sid"] for s in policy["Statement"]]
    assert len(sids) == len(set(sids)) and all(sid.isalnum() for sid in sids), sids
    for statement in policy["Statement"]:
        actions, resources = _list(statement["Action"]), _list(statement["Resource"])
        assert statement["Effect"] == "Allow" and all("*" not in a for a in actions), statement
        if resources == ["*"]:
            # Only actions that take no resource ARN get '*'.
            assert all(re.match(r"(sagemaker:List|application-autoscaling:|cloudwatch:Describe|ecr:GetAuthorizationToken)", a) for a in actions), statement
        for action in actions:
            if action.startswith("s3:"):
                assert all(r.startswith("arn:aws:s3:::models-bucket") for r in resources), statement
            if action.startswith("logs:"):
                assert resources == ["arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/*"], statement
            if action.startswith("kms:"):
                assert resources == [KEY], statement
    (passrole,) = allowed(policy, "iam:PassRole")
    assert passrole["Resource"] == ROLE
    assert passrole["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    (objects,) = {json.dumps(s["Resource"]) for s in allowed(policy, "s3:PutObject")}
    assert json.loads(objects) == "arn:aws:s3:::models-bucket/cloudllm/*"
    assert allowed(policy, "s3:ListBucket")[0]["Resource"] == "arn:aws:s3:::models-bucket"
    (grant,) = allowed(policy, "kms:CreateGrant")
    assert grant["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}


def test_kms_permissions_only_with_a_key() -> None:
    policy = iam.sagemaker_policy(iam.aws_scope(buckets=["s3://bkt"], roles=[ROLE]))
    assert not any(a.startswith("kms:") for s in policy["Statement"] for a in _list(s["Action"]))
    assert allowed(policy, "s3:PutObject")[0]["Resource"] == "arn:aws:s3:::bkt/*"
    # The role names the account: the ARNs use it.
    assert allowed(policy, "sagemaker:CreateModel")[0]["Resource"][0] == "arn:aws:sagemaker:*:123456789012:model/*"


# --- the command ------------------------------------------------------------------------------------
def test_iam_policy_command_prints_the_policy_json() -> None:
    result = run_cli(
        "iam-policy", "--provider", "sagemaker", "--bucket", "s3://models-bucket/cloudllm",
        "--role", ROLE, "--region", "us-east-1", "--kms-key", KEY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(full_policy()))
    assert result.stderr == ""


def test_iam_policy_without_scope_says_what_to_pass() -> None:
    result = run_cli("iam-policy", "--provider", "sagemaker")
    assert result.returncode == 0
    policy = json.loads(result.stdout)
    assert allowed(policy, "s3:PutObject")[0]["Resource"] == "arn:aws:s3:::BUCKET/*"
    assert "pass --bucket" in result.stderr and "pass --role" in result.stderr


def test_iam_policy_reads_buckets_roles_and_keys_from_cloudllm_yaml(tmp_path: Path, tiny_gpt2: Path) -> None:
    path = tmp_path / "cloudllm.yaml"
    path.write_text(
        f"defaults:\n  provider: sagemaker\n  region: eu-west-1\n  options: {{role: {ROLE}}}\n"
        f"endpoints:\n  - name: a\n    model: {tiny_gpt2}\n    bucket: s3://bucket-a/m\n"
        f"  - name: b\n    model: {tiny_gpt2}\n    bucket: s3://bucket-b\n    options: {{role: {ROLE}, kms_key: {KEY}}}\n"
    )
    result = run_cli("iam-policy", "--provider", "sagemaker", "-f", str(path))
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    assert allowed(policy, "s3:PutObject")[0]["Resource"] == ["arn:aws:s3:::bucket-a/m/*", "arn:aws:s3:::bucket-b/*"]
    assert allowed(policy, "kms:Decrypt")[0]["Resource"] == KEY
    assert allowed(policy, "logs:FilterLogEvents")[0]["Resource"].startswith("arn:aws:logs:eu-west-1:123456789012:")


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["--bucket", "gs://wrong-cloud"], "--bucket 'gs://wrong-cloud' is not an s3:// location"),
        (["--bucket", "s3://b"], "does not name a valid S3 bucket"),
        (["--role", "SageMakerExec"], "is not an IAM role ARN"),
        (["--kms-key", "alias/my-key"], "pass the key ARN"),
        (["--account", "12345"], "12-digit"),
    ],
)
def test_iam_policy_bad_flags(args: list[str], contains: str) -> None:
    assert_one_line_error(run_cli("iam-policy", "--provider", "sagemaker", *args), code=2, contains=contains)


def test_vertex_roles_and_gcloud_commands() -> None:
    member = "serviceAccount:ci@my-proj.iam.gserviceaccount.com"
    result = run_cli("iam-policy", "--provider", "vertex", "--project", "my-proj", "--bucket", "gs://my-bucket/models", "--member", member)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("gcloud ")]
    assert f"gcloud projects add-iam-policy-binding my-proj --member={member} --role=roles/aiplatform.user" in commands
    assert f"gcloud storage buckets add-iam-policy-binding gs://my-bucket --member={member} --role=roles/storage.objectAdmin" in commands

    as_json = json.loads(run_cli("iam-policy", "--provider", "vertex", "--project", "p", "--bucket", "gs://bkt", "--json").stdout)
    assert set(as_json) == {"provider", "bindings", "commands"}
    roles = {(b["role"], b["scope"]) for b in as_json["bindings"]}
    assert roles == {("roles/aiplatform.user", "project"), ("roles/storage.objectAdmin", "bucket"), ("roles/logging.viewer", "project")}

    with_sa = iam.vertex_bindings(project="p", service_account="runner@p.iam.gserviceaccount.com", kms_keys=["projects/p/locations/us/keyRings/r/cryptoKeys/k"])
    assert ("roles/iam.serviceAccountUser", "service-account") in {(b.role, b.scope) for b in with_sa}
    assert {b.member for b in with_sa if b.scope == "key"} == {
        "serviceAccount:service-PROJECT_NUMBER@gcp-sa-aiplatform.iam.gserviceaccount.com",
        "serviceAccount:service-PROJECT_NUMBER@gs-project-accounts.iam.gserviceaccount.com",
    }


VERTEX_SOURCES = sorted((PACKAGE / "providers" / "vertex").glob("*.py"))  # the Vertex provider package's modules


def test_vertex_roles_cover_the_google_services_the_tool_uses() -> None:
    sources = [p for p in (*VERTEX_SOURCES, PACKAGE / "storage" / "gcs.py") if p.exists()]
    if not sources:
        pytest.skip("no Vertex provider yet")
    text = "\n".join(p.read_text() for p in sources)
    used = set(re.findall(r"google\.cloud\.(aiplatform|storage|logging)", text)) | set(re.findall(r"from google\.cloud import (aiplatform|storage|logging)", text))
    assert used, "the scan found no Google Cloud client in the Vertex sources"
    bindings = iam.vertex_bindings(project="p", buckets=["gs://bkt"])
    role_for = {"aiplatform": ("roles/aiplatform.user", "project"), "storage": ("roles/storage.objectAdmin", "bucket"), "logging": ("roles/logging.viewer", "project")}
    have = {(b.role, b.scope) for b in bindings}
    assert {role_for[service] for service in used} <= have
    # Least privilege: storage only on the bucket, and no basic or admin roles anywhere.
    assert not any(b.role.startswith("roles/storage") and b.scope == "project" for b in bindings)
    assert not any(b.role in ("roles/owner", "roles/editor") or b.role.endswith(".admin") for b in bindings)


# Storage calls that read the bucket resource itself (storage.buckets.get), which roles/storage.objectAdmin does not grant.
BUCKET_GET_CALLS = re.compile(r"\.(lookup_bucket|get_bucket|get_iam_policy|test_iam_permissions)\(|\bbucket\([^)]*\)\.(reload|exists)\(")


def test_the_vertex_storage_calls_need_only_what_object_admin_grants(vertex_emulator) -> None:
    """The user's side of gcs.py and vertex.py (not the emulator, which plays the service) lists, writes and deletes objects only."""
    for path in (PACKAGE / "storage" / "gcs.py", *VERTEX_SOURCES):
        calls = BUCKET_GET_CALLS.findall(path.read_text())
        assert not calls, f"{path.name} calls {calls}: storage.buckets.get is not in roles/storage.objectAdmin"
    from cloudllm.storage.gcs import GcsArtifacts, GcsUri

    GcsArtifacts(vertex_emulator.storage_client()).check_bucket(GcsUri("cloudllm-test"))  # the check it does instead works
    (binding,) = [b for b in iam.vertex_bindings(project="p", buckets=["gs://bkt/models"]) if b.scope == "bucket"]
    assert binding.role == "roles/storage.objectAdmin" and "check the bucket (a one-object list)" in binding.why
