"""The least privilege cloudllm needs: an IAM policy for SageMaker, role bindings for Vertex AI.

`OPERATIONS` lists the AWS API calls cloudllm makes (tests/test_iam.py checks it against the
provider and storage sources); each `Permission` says which of those calls make AWS check it.
The policy holds exactly the permissions some call needs, on the narrowest resources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cloudllm.errors import UserError

SAGEMAKER_SERVICE = "sagemaker.amazonaws.com"
AUTOSCALING_SERVICE = "sagemaker.application-autoscaling.amazonaws.com"

# Every AWS call cloudllm makes, as "boto3 client name:OperationName". boto3's transfer
# manager adds the multipart and copy calls behind `manager.upload` / `manager.copy`.
OPERATIONS: frozenset[str] = frozenset(
    {
        *(f"sagemaker:{op}" for op in (
            "CreateModel", "DescribeModel", "DeleteModel", "ListModels",
            "CreateEndpointConfig", "DescribeEndpointConfig", "DeleteEndpointConfig", "ListEndpointConfigs",
            "CreateEndpoint", "DescribeEndpoint", "UpdateEndpoint", "DeleteEndpoint", "ListEndpoints",
            "UpdateEndpointWeightsAndCapacities", "AddTags", "DeleteTags", "ListTags",
            # Inference components: adapters, several models and scale to zero (providers/sagemaker/components.py).
            "CreateInferenceComponent", "DescribeInferenceComponent", "UpdateInferenceComponent",
            "DeleteInferenceComponent", "ListInferenceComponents",
        )),  # fmt: skip
        "cloudwatch:PutMetricAlarm", "cloudwatch:DeleteAlarms",  # the alarm that wakes a component scaled to zero
        "sagemaker-runtime:InvokeEndpoint",
        "sagemaker-runtime:InvokeEndpointWithResponseStream",
        *(f"application-autoscaling:{op}" for op in (
            "RegisterScalableTarget", "DeregisterScalableTarget", "DescribeScalableTargets",
            "PutScalingPolicy", "DeleteScalingPolicy", "DescribeScalingPolicies",
        )),  # fmt: skip
        *(f"s3:{op}" for op in (
            "HeadBucket", "ListObjectsV2", "HeadObject", "GetObject", "PutObject", "DeleteObject", "DeleteObjects",
            "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload",
            "ListMultipartUploads", "ListParts",
            "CopyObject", "UploadPartCopy",
        )),  # fmt: skip
        "iam:GetRole",
        "logs:FilterLogEvents",
        # `cloudllm push` / `deploy --image build` to ECR (the layers go through the registry API, below).
        "ecr:GetAuthorizationToken", "ecr:DescribeRepositories", "ecr:CreateRepository",
    }
)


@dataclass(frozen=True)
class Permission:
    """IAM actions on one kind of resource, and the calls that make AWS check them."""

    sid: str
    actions: tuple[str, ...]
    resource: str  # key of _resources(): sagemaker, endpoints, components, any, objects, bucket, role, slr, alarms, logs, kms, repositories
    needed_by: tuple[str, ...]
    why: str
    condition: str | None = None  # key of _conditions()
    kms_only: bool = False  # only with a customer-managed key


_SM_RESOURCE_OPS = (
    "CreateModel", "DescribeModel", "DeleteModel", "CreateEndpointConfig", "DescribeEndpointConfig", "DeleteEndpointConfig",
    "CreateEndpoint", "DescribeEndpoint", "UpdateEndpoint", "DeleteEndpoint", "DeleteTags", "ListTags",
    "CreateInferenceComponent", "DescribeInferenceComponent", "UpdateInferenceComponent", "DeleteInferenceComponent",
)  # fmt: skip
_S3_WRITES = ("s3:PutObject", "s3:CreateMultipartUpload", "s3:UploadPart", "s3:CompleteMultipartUpload", "s3:CopyObject", "s3:UploadPartCopy")

PERMISSIONS: tuple[Permission, ...] = (
    *(
        Permission("SageMakerResources", (f"sagemaker:{op}",), "sagemaker", (f"sagemaker:{op}",), "deploy, update, read and delete endpoints")
        for op in _SM_RESOURCE_OPS
    ),
    Permission(
        "SageMakerResources", ("sagemaker:AddTags",), "sagemaker",
        ("sagemaker:AddTags", "sagemaker:CreateModel", "sagemaker:CreateEndpointConfig", "sagemaker:CreateEndpoint", "sagemaker:CreateInferenceComponent"),
        "retag the endpoint; creating a resource with Tags= needs AddTags on it too (the tags hold the plan's digests)",
    ),
    *(
        Permission("SageMakerList", (f"sagemaker:{op}",), "any", (f"sagemaker:{op}",), "list actions take no resource ARN")
        for op in ("ListModels", "ListEndpointConfigs", "ListEndpoints", "ListInferenceComponents")
    ),
    Permission(
        "InvokeEndpoints", ("sagemaker:InvokeEndpoint",), "endpoints",
        ("sagemaker-runtime:InvokeEndpoint", "sagemaker-runtime:InvokeEndpointWithResponseStream"),
        "cloudllm invoke (streaming is authorised by sagemaker:InvokeEndpoint too)",
    ),
    Permission(
        "InvokeComponents", ("sagemaker:InvokeEndpoint",), "components",
        ("sagemaker-runtime:InvokeEndpoint", "sagemaker-runtime:InvokeEndpointWithResponseStream"),
        "invoke names the endpoint's inference component (a model or an adapter), which SageMaker authorises too",
    ),
    Permission(
        "AutoscalingComponents", ("sagemaker:UpdateInferenceComponentRuntimeConfig",), "components",
        ("application-autoscaling:RegisterScalableTarget",),
        "Application Auto Scaling checks that the caller may change a component's copy count (scale to zero)",
    ),
    *(
        Permission("Autoscaling", (f"application-autoscaling:{op}",), "any", (f"application-autoscaling:{op}",), "min/max instances and the scaling policy")
        for op in ("RegisterScalableTarget", "DeregisterScalableTarget", "DescribeScalableTargets",
                   "PutScalingPolicy", "DeleteScalingPolicy", "DescribeScalingPolicies")
    ),  # fmt: skip
    Permission(
        "AutoscalingTarget", ("sagemaker:UpdateEndpointWeightsAndCapacities",), "endpoints",
        ("application-autoscaling:RegisterScalableTarget", "sagemaker:UpdateEndpointWeightsAndCapacities"),
        "Application Auto Scaling checks that the caller may change the variant's instance count; "
        "turning autoscaling off in place sets the count back",
    ),
    Permission(
        "AutoscalingServiceLinkedRole", ("iam:CreateServiceLinkedRole",), "slr",
        ("application-autoscaling:RegisterScalableTarget",),
        "the first scalable target of an account creates Application Auto Scaling's SageMaker role",
        condition="slr",
    ),
    Permission(
        "AutoscalingAlarms", ("cloudwatch:PutMetricAlarm", "cloudwatch:DeleteAlarms"), "alarms",
        ("application-autoscaling:PutScalingPolicy", "application-autoscaling:DeleteScalingPolicy", "cloudwatch:PutMetricAlarm", "cloudwatch:DeleteAlarms"),
        "a target-tracking policy creates and removes its CloudWatch alarms as the caller; scale to zero's "
        "alarm on NoCapacityInvocationFailures runs the step policy that wakes a component",
    ),
    Permission(
        "AutoscalingAlarmsRead", ("cloudwatch:DescribeAlarms",), "any",
        ("application-autoscaling:PutScalingPolicy",),
        "a target-tracking policy reads its alarms (DescribeAlarms takes no resource ARN)",
    ),
    Permission("ArtifactObjects", ("s3:GetObject",), "objects", ("s3:GetObject", "s3:HeadObject", "s3:CopyObject", "s3:UploadPartCopy"),
               "read manifests; copy unchanged files between versions"),
    Permission("ArtifactObjects", ("s3:PutObject",), "objects", _S3_WRITES, "upload artifacts (multipart for large files)"),
    Permission("ArtifactObjects", ("s3:DeleteObject",), "objects", ("s3:DeleteObjects", "s3:DeleteObject"), "remove old artifact versions"),
    Permission("ArtifactObjects", ("s3:AbortMultipartUpload",), "objects", ("s3:AbortMultipartUpload",), "abandon a failed multipart upload"),
    Permission("ArtifactObjects", ("s3:ListMultipartUploadParts",), "objects", ("s3:ListParts",), "resume an interrupted upload"),
    Permission("ArtifactBucket", ("s3:ListBucket",), "bucket", ("s3:ListObjectsV2", "s3:HeadBucket"), "find artifact versions; check the bucket"),
    Permission("ArtifactBucket", ("s3:ListBucketMultipartUploads",), "bucket", ("s3:ListMultipartUploads",), "find an interrupted upload"),
    Permission("ArtifactBucket", ("s3:GetBucketLocation",), "bucket", ("s3:GetBucketLocation",), "check the bucket's region"),
    Permission(
        "PassExecutionRole", ("iam:PassRole",), "role", ("sagemaker:CreateModel",),
        "the model runs as the execution role (--role); only SageMaker may receive it",
        condition="passrole",
    ),
    Permission("EcrLogin", ("ecr:GetAuthorizationToken",), "any", ("ecr:GetAuthorizationToken",), "cloudllm push: a registry login"),
    Permission(
        "PushServingImage",
        ("ecr:DescribeRepositories", "ecr:CreateRepository", "ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload",
         "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:PutImage", "ecr:BatchGetImage"),
        "repositories", ("ecr:DescribeRepositories", "ecr:CreateRepository"),
        "cloudllm push: the repository (created if missing) and its layers; layers already there are not sent",
    ),  # fmt: skip
    Permission("ReadExecutionRole", ("iam:GetRole",), "role", ("iam:GetRole",), "check that --role exists before creating anything"),
    Permission("EndpointLogs", ("logs:FilterLogEvents",), "logs", ("logs:FilterLogEvents",), "cloudllm logs"),
    Permission("EndpointLogs", ("logs:GetLogEvents",), "logs", ("logs:GetLogEvents",), "cloudllm logs --follow"),
    Permission("EndpointLogs", ("logs:DescribeLogStreams",), "logs", ("logs:DescribeLogStreams",), "cloudllm logs --follow"),
    Permission(
        "ArtifactEncryptionKey", ("kms:GenerateDataKey", "kms:Decrypt"), "kms", (*_S3_WRITES, "s3:GetObject"),
        "SSE-KMS uploads (multipart needs Decrypt) and reads of the artifacts",
        kms_only=True,
    ),
    Permission(
        "VolumeEncryptionKey", ("kms:CreateGrant", "kms:DescribeKey"), "kms", ("sagemaker:CreateEndpointConfig",),
        "SageMaker encrypts the endpoint's storage volume with the key through a grant",
        condition="grant",
        kms_only=True,
    ),
)


@dataclass
class AwsScope:
    """Where the policy applies; '*' where unknown."""

    partition: str = "aws"
    region: str = "*"
    account: str = "*"
    buckets: list[tuple[str, str]] = field(default_factory=list)  # (bucket, prefix)
    roles: list[str] = field(default_factory=list)
    kms_keys: list[str] = field(default_factory=list)


def sagemaker_policy(scope: AwsScope, operations: frozenset[str] = OPERATIONS) -> dict[str, Any]:
    """The IAM policy document (JSON-ready) allowing exactly what `operations` need."""
    resources = _resources(scope)
    conditions = _conditions()
    statements: dict[tuple, dict[str, Any]] = {}
    for perm in PERMISSIONS:
        if not operations.intersection(perm.needed_by) or (perm.kms_only and not scope.kms_keys):
            continue
        key = (perm.sid, perm.resource, perm.condition)
        statement = statements.setdefault(
            key,
            {"Sid": perm.sid, "Effect": "Allow", "Action": [], "Resource": resources[perm.resource]},
        )
        if perm.condition:
            statement["Condition"] = conditions[perm.condition]
        for action in perm.actions:
            if action not in statement["Action"]:
                statement["Action"].append(action)
    body = []
    for statement in statements.values():
        statement["Action"] = sorted(statement["Action"])
        if len(statement["Resource"]) == 1:
            statement["Resource"] = statement["Resource"][0]
        body.append(statement)
    return {"Version": "2012-10-17", "Statement": body}


def aws_scope(
    *,
    region: str | None = None,
    account: str | None = None,
    buckets: list[str] | tuple[str, ...] = (),
    roles: list[str] | tuple[str, ...] = (),
    kms_keys: list[str] | tuple[str, ...] = (),
) -> AwsScope:
    """Parse the user's flags (s3:// URIs, role ARNs, key ARNs) into a scope; UserError on bad ones."""
    scope = AwsScope(region=region or "*", account=account or "*")
    if account and not re.fullmatch(r"\d{12}", account):
        raise UserError(f"--account {account!r} is not a 12-digit AWS account id", "write it like 123456789012")
    for uri in buckets:
        match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", uri.strip())
        if not match and uri.strip().startswith("s3://"):
            raise UserError(
                f"--bucket {uri!r} does not name a valid S3 bucket",
                "bucket names are 3-63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit",
            )
        if not match:
            raise UserError(f"--bucket {uri!r} is not an s3:// location", "write it as s3://BUCKET or s3://BUCKET/PREFIX")
        scope.buckets.append((match.group(1), (match.group(2) or "").strip("/")))
    for role in roles:
        match = re.fullmatch(r"arn:(aws[a-z\-]*):iam::(\d{12}):role/[\w+=,.@/\-]+", role.strip())
        if not match:
            raise UserError(f"--role {role!r} is not an IAM role ARN", "write it as arn:aws:iam::123456789012:role/NAME")
        scope.partition = match.group(1)
        if scope.account == "*":
            scope.account = match.group(2)
        scope.roles.append(role.strip())
    for key in kms_keys:
        key = key.strip()
        if re.fullmatch(r"arn:aws[a-z\-]*:kms:[a-z0-9\-]+:\d{12}:key/[\w\-]+", key):
            scope.kms_keys.append(key)
        elif re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}", key):
            scope.kms_keys.append(f"arn:{scope.partition}:kms:{scope.region}:{scope.account}:key/{key}")
        else:
            raise UserError(f"--kms-key {key!r} is not a KMS key ARN or id", "pass the key ARN (aliases cannot be granted in IAM policies)")
    return scope


def _resources(scope: AwsScope) -> dict[str, list[str]]:
    arn = f"arn:{scope.partition}"
    sm = f"{arn}:sagemaker:{scope.region}:{scope.account}"
    buckets = scope.buckets or [("BUCKET", "")]
    return {
        "sagemaker": [f"{sm}:model/*", f"{sm}:endpoint-config/*", f"{sm}:endpoint/*", f"{sm}:inference-component/*"],
        "endpoints": [f"{sm}:endpoint/*"],
        "components": [f"{sm}:inference-component/*"],
        "any": ["*"],
        "objects": [f"{arn}:s3:::{b}/{p}/*" if p else f"{arn}:s3:::{b}/*" for b, p in buckets],
        "bucket": sorted({f"{arn}:s3:::{b}" for b, _ in buckets}),
        "role": scope.roles or [f"{arn}:iam::{scope.account}:role/*"],
        "slr": [f"{arn}:iam::{scope.account}:role/aws-service-role/{AUTOSCALING_SERVICE}/AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint"],
        "alarms": [
            f"{arn}:cloudwatch:{scope.region}:{scope.account}:alarm:{name}"
            for name in ("TargetTracking-endpoint/*", "TargetTracking-inference-component/*", "*-no-capacity")
        ],
        "logs": [f"{arn}:logs:{scope.region}:{scope.account}:log-group:/aws/sagemaker/Endpoints/*"],
        "kms": scope.kms_keys,
        "repositories": [f"{arn}:ecr:{scope.region}:{scope.account}:repository/*"],
    }


def _conditions() -> dict[str, dict]:
    return {
        "passrole": {"StringEquals": {"iam:PassedToService": SAGEMAKER_SERVICE}},
        "slr": {"StringLike": {"iam:AWSServiceName": AUTOSCALING_SERVICE}},
        "grant": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
    }


def policy_notes(scope: AwsScope) -> list[str]:
    """What the user should fill in to narrow the policy further."""
    notes = []
    if not scope.buckets:
        notes.append("no --bucket: S3 statements name the placeholder bucket BUCKET; pass --bucket s3://BUCKET/PREFIX")
    if not scope.roles:
        notes.append("no --role: iam:PassRole allows any role of the account (to SageMaker only); pass --role ARN")
    if scope.region == "*" or scope.account == "*":
        notes.append("region or account unknown: '*' used in ARNs; pass --region and --account (or --role, which names the account)")
    return notes


# --- Vertex AI ----------------------------------------------------------------------------------
@dataclass
class GcpBinding:
    role: str
    scope: str  # project | bucket | service-account | key
    resource: str
    member: str
    why: str

    def command(self) -> str:
        if self.scope == "project":
            return f"gcloud projects add-iam-policy-binding {self.resource} --member={self.member} --role={self.role}"
        if self.scope == "bucket":
            return f"gcloud storage buckets add-iam-policy-binding {self.resource} --member={self.member} --role={self.role}"
        if self.scope == "service-account":
            return f"gcloud iam service-accounts add-iam-policy-binding {self.resource} --member={self.member} --role={self.role}"
        return f"gcloud kms keys add-iam-policy-binding {self.resource} --member={self.member} --role={self.role}"


def vertex_bindings(
    *,
    project: str | None = None,
    buckets: list[str] | tuple[str, ...] = (),
    member: str | None = None,
    service_account: str | None = None,
    kms_keys: list[str] | tuple[str, ...] = (),
) -> list[GcpBinding]:
    """The roles the identity running cloudllm needs (and, with a key, the service agents)."""
    project = project or "PROJECT"
    member = member or "user:YOU@example.com"
    bucket_names = [] if buckets else ["gs://BUCKET"]
    for uri in buckets:
        match = re.fullmatch(r"gs://([a-z0-9][a-z0-9._\-]{1,220}[a-z0-9])(?:/.*)?", uri.strip())
        if not match:
            raise UserError(f"--bucket {uri!r} is not a gs:// location", "write it as gs://BUCKET or gs://BUCKET/PREFIX")
        bucket_names.append(f"gs://{match.group(1)}")
    bindings = [
        GcpBinding("roles/aiplatform.user", "project", project, member, "upload models, create endpoints, deploy, predict, delete"),
        *(
            GcpBinding(
                "roles/storage.objectAdmin", "bucket", name, member,
                "check the bucket (a one-object list), upload, copy, list and delete the artifacts; bucket only "
                "(it grants storage.objects.*, not storage.buckets.get, so cloudllm never reads the bucket itself)",
            )  # fmt: skip
            for name in sorted(set(bucket_names))
        ),
        GcpBinding("roles/logging.viewer", "project", project, member, "cloudllm logs: read the endpoint's Cloud Logging entries"),
    ]
    if service_account:
        bindings.append(
            GcpBinding("roles/iam.serviceAccountUser", "service-account", service_account, member, "deploy models that run as this service account")
        )
    for key in kms_keys:
        # The service agents, not the user, encrypt with the key (project number, not id).
        for agent, why in (
            ("service-PROJECT_NUMBER@gcp-sa-aiplatform.iam.gserviceaccount.com", "Vertex AI encrypts models and endpoints with the key"),
            ("service-PROJECT_NUMBER@gs-project-accounts.iam.gserviceaccount.com", "Cloud Storage encrypts the artifacts with the key"),
        ):
            bindings.append(GcpBinding("roles/cloudkms.cryptoKeyEncrypterDecrypter", "key", key, f"serviceAccount:{agent}", why))
    return bindings
