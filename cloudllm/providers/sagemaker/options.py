"""The options the SageMaker provider reads (spec.options, --option KEY=VALUE, the deploy flags that fill them)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, StrictBool

from cloudllm.providers.kit import RolloutOptions


class SageMakerOptions(RolloutOptions):
    """Options of the sagemaker provider."""

    role: str | None = Field(None, description="IAM role ARN the endpoint's container runs as (--role); deploy needs it.")
    profile: str | None = Field(None, description="AWS profile whose credentials and region are used (--profile).")
    kms_key: str | None = Field(None, description="KMS key ARN for the uploaded artifacts and the instance's volume (--kms-key).")
    network_isolation: StrictBool = Field(False, description="Run the container without network access (--network-isolation).")
    vpc_subnets: list[str] | None = Field(None, description="Subnet ids the endpoint runs in (--vpc-subnets); needs vpc_security_groups.")
    vpc_security_groups: list[str] | None = Field(None, description="Security group ids of the endpoint (--vpc-security-groups).")
    rollback_alarms: list[str] | None = Field(
        None, description="CloudWatch alarms whose firing rolls a blue/green update back (--rollback-alarm)."
    )
    num_gpus: int | None = Field(None, ge=1, le=64, description="GPUs of an instance type cloudllm's catalog does not know.")
    volume_size: int | None = Field(None, ge=1, le=512, description="GB of EBS volume per instance (default: from the model's size).")
    download_timeout: int | None = Field(None, ge=60, le=3600, description="Seconds SageMaker may take to download the model.")
    startup_timeout: int | None = Field(None, ge=60, le=3600, description="Seconds the container may take to answer /ping.")
    bucket: str | None = Field(
        None, description="Where the endpoint's artifacts were uploaded: recorded by deploy, read by `delete --purge-artifacts`."
    )
    components: dict[str, Any] | None = Field(
        None, description="Recorded by deploy: the endpoint's inference components (models, runtime, image); not set by hand."
    )
