"""Reaching AWS: the boto3 session and clients (region, profile, AWS_ENDPOINT_URL), and AWS errors as one line."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from cloudllm import __version__
from cloudllm.errors import DeployFailed, UserError
from cloudllm.storage.s3 import S3Artifacts

NO_REGION = "no AWS region is set"
NOT_FOUND = ("Could not find", "does not exist", "not found", "No scaling policy found")
DENIED = ("AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredTokenException")


def check_region(region: str) -> None:
    """UserError for a name that is no AWS region (a typo like us-east1), from botocore's partitions.

    A name listed there, or shaped like a partition's regions (one newer than this botocore), passes.
    """
    import difflib

    partitions = _partitions()
    listed = sorted(r for p in partitions for r in p.get("regions", {}) if not r.endswith("-global"))
    if region in listed or any(re.match(p["regionRegex"], region) for p in partitions):
        return
    close = difflib.get_close_matches(region, listed, n=1, cutoff=0.8)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"unknown AWS region {region!r}", f"{hint}pass --region with a region name like us-east-1")


def _partitions() -> list[dict]:
    """botocore's partitions (regions and their pattern), read from its data file: importing botocore for it costs more."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("botocore")
    if spec is not None and spec.submodule_search_locations:
        try:
            return json.loads((Path(next(iter(spec.submodule_search_locations))) / "data" / "partitions.json").read_text())["partitions"]
        except (OSError, ValueError, KeyError):
            pass
    import botocore.loaders

    return botocore.loaders.create_loader().load_data("partitions")["partitions"]


def configured_region() -> str | None | bool:
    """The region botocore would resolve, read without botocore: AWS_DEFAULT_REGION, else the profile's
    `region` in the config file. None: no region anywhere. False: not sure (a profile that is in no file,
    a file configparser cannot read): then the caller asks a boto3 session, which also says what is wrong."""
    import configparser
    import os
    from pathlib import Path

    if os.environ.get("AWS_DEFAULT_REGION"):
        return os.environ["AWS_DEFAULT_REGION"]
    profile = os.environ.get("AWS_DEFAULT_PROFILE") or os.environ.get("AWS_PROFILE")
    found = configparser.RawConfigParser()
    try:
        found.read(Path(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config").expanduser())
    except configparser.Error:
        return False
    section = "default" if profile in (None, "default") else f"profile {profile}"
    if profile not in (None, "default") and not found.has_section(section):
        return False  # perhaps only in the credentials file, perhaps nowhere
    return found.get(section, "region", fallback=None) or None


def _no_region() -> UserError:
    return UserError(NO_REGION, "pass --region, or set AWS_DEFAULT_REGION or a region in ~/.aws/config")


def aws_error(exc) -> tuple[str, str]:
    error = exc.response.get("Error", {})
    message = str(error.get("Message") or exc).strip().splitlines()
    return str(error.get("Code", "")), (message[0] if message else "")


def already_exists(exc) -> bool:
    code, message = aws_error(exc)
    return code == "ValidationException" and "already existing" in message


def in_progress(exc) -> bool:
    code, message = aws_error(exc)
    return code == "ValidationException" and "in-progress" in message


def retried(exc) -> bool:
    """botocore sent the call more than once (a throttled, failed or dropped attempt came first)."""
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0) > 0


def message_of(exc) -> str:
    return aws_error(exc)[1]


def gone_already(exc) -> bool:
    """A delete whose earlier attempt went through: SageMaker says the resource does not exist."""
    code, message = aws_error(exc)
    return code in ("ValidationException", "ObjectNotFoundException") and any(s in message for s in NOT_FOUND)


class SageMakerSession:
    """The session, clients and error translation of a SageMakerProvider."""

    # --- AWS access -------------------------------------------------------------------------
    def _configured(self):
        """The boto3 session with its profile and region resolved: local configuration only, no credentials needed."""
        if self._boto_session is None:
            if not self.region and not self.options.get("profile") and configured_region() is None:
                raise _no_region()  # what boto3 would find, without importing it
            import boto3
            from botocore.exceptions import ProfileNotFound

            try:
                session = boto3.Session(profile_name=self.options.get("profile"), region_name=self.region)
            except ProfileNotFound:
                raise UserError(f"AWS profile {self.options.get('profile')!r} is not configured", "see `aws configure list-profiles`") from None
            if not session.region_name:
                raise _no_region()
            check_region(session.region_name)
            self.region = session.region_name
            self._boto_session = session
        return self._boto_session

    def _region_configured(self) -> bool:
        """True when a region is given or configured (and valid); False when none is, which only deploy refuses.

        Read from the environment and the config file where that is certain: a boto3 session costs
        `cloudllm plan` more than the rest of its checks together."""
        # --profile: the session says whether that profile exists, as before
        region = False if self.options.get("profile") else self.region or configured_region()
        if region is None:
            return False
        if region is not False:
            check_region(region)
            self.region = region
            return True
        try:
            self._configured()
        except UserError as exc:
            if exc.problem == NO_REGION:
                return False
            raise
        return True

    def _session(self):
        """The boto3 session, once it has credentials to sign with."""
        session = self._configured()
        if not self._has_credentials:
            if session.get_credentials() is None:
                raise UserError(
                    "no AWS credentials found",
                    "run `aws configure` or `aws sso login`, pass --profile, or point AWS_ENDPOINT_URL at `cloudllm emulate sagemaker`",
                )
            self._has_credentials = True
        return session

    def _client(self, service: str):
        if service not in self._clients:
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": 8},
                user_agent_extra=f"cloudllm/{__version__}",
                # Invocations may take SageMaker's full 60 s; the SDK docs advise a 70 s socket timeout.
                read_timeout=70 if service == "sagemaker-runtime" else 60,
            )
            self._clients[service] = self._session().client(service, config=config)
        return self._clients[service]

    @property
    def _sm(self):
        return self._client("sagemaker")

    @property
    def _scaling(self):
        return self._client("application-autoscaling")

    def _artifacts(self) -> S3Artifacts:
        return S3Artifacts(self._client("s3"))

    @contextmanager
    def _aws(self, what: str) -> Iterator[None]:
        """Turn AWS errors into one line: what failed, what AWS said, and what to do."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise UserError("no AWS credentials found", "run `aws configure`, or pass --profile") from None
        except EndpointConnectionError as exc:
            raise DeployFailed(f"cannot reach AWS to {what}: {exc}", "check the network, --region and AWS_ENDPOINT_URL") from None
        except ClientError as exc:
            code, message = aws_error(exc)
            if code in DENIED:
                raise UserError(f"AWS refused to {what}: {message}", "check your credentials and the IAM permissions they carry") from None
            if code == "ResourceLimitExceeded" and "inference component" in what:  # copies that do not fit the endpoint's instances
                raise UserError(f"cannot {what}: {message}", "use a bigger --instance, fewer copies (--min-instances) or more --max-instances (`cloudllm plan` shows each model's reservation)") from None
            if code == "ResourceLimitExceeded":
                raise UserError(f"cannot {what}: {message}", "request a quota increase in Service Quotas, or pick another --instance") from None
            raise DeployFailed(f"cannot {what}: {message}", "fix what SageMaker names, then deploy again") from None
        except BotoCoreError as exc:
            raise DeployFailed(f"cannot {what}: {exc}", "run the same command again") from None
