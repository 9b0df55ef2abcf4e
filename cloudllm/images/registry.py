"""`cloudllm push`: the serving image to ECR or Artifact Registry, through skopeo or the builder.

ECR: the repository is created if missing and the login comes from GetAuthorizationToken with
boto3's credential chain. Artifact Registry: REGION-docker.pkg.dev/PROJECT/REPO/IMAGE with an
access token from Application Default Credentials. CLOUDLLM_REGISTRY_ENDPOINT (host:port) sends
the registry traffic to a stand-in on loopback, as AWS_ENDPOINT_URL does for the API: the image
keeps its cloud URI, only the transport changes (plain HTTP there).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from cloudllm.errors import DeployFailed, UserError
from cloudllm.images.builders import Tool, find_builder, find_tool, image_id

REGISTRY_ENDPOINT_ENV = "CLOUDLLM_REGISTRY_ENDPOINT"
DEFAULT_AR_REPOSITORY = "cloudllm"


@dataclass
class RegistryLogin:
    registry: str  # the host in the image's URI (account.dkr.ecr.region.amazonaws.com, REGION-docker.pkg.dev)
    username: str
    password: str = field(repr=False)


@dataclass
class PushResult:
    uri: str  # registry/repository:tag
    digest: str
    layers_sent: int
    layers_skipped: int
    seconds: float
    tool: str

    @property
    def by_digest(self) -> str:
        return f"{self.uri.rsplit(':', 1)[0]}@{self.digest}"

    def to_dict(self) -> dict:
        return {**asdict(self), "by_digest": self.by_digest}


def split_image(image: str) -> tuple[str, str]:
    """(name without registry, tag) of a local image reference such as cloudllm-serve:abc or localhost/x:y."""
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    return name.rsplit("/", 1)[-1], tag


def ecr_login(region: str, repository: str, *, profile: str | None = None, say: Callable[[str], None] = lambda _: None) -> tuple[RegistryLogin, str]:
    """(login, repository URI): the repository created if missing, the token from GetAuthorizationToken."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        ecr = boto3.Session(profile_name=profile, region_name=region).client("ecr")
        try:
            repo = ecr.describe_repositories(repositoryNames=[repository])["repositories"][0]
        except ecr.exceptions.RepositoryNotFoundException:
            say(f"creating ECR repository {repository}")
            repo = ecr.create_repository(repositoryName=repository, imageScanningConfiguration={"scanOnPush": True})["repository"]
        token = ecr.get_authorization_token()["authorizationData"][0]
    except NoCredentialsError:
        raise UserError("no AWS credentials for ECR", "configure them (`aws configure`, AWS_PROFILE or --profile)") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise UserError(f"ECR refused: {error.get('Code')}: {error.get('Message')}", "check the credentials' ecr:* permissions and the region") from None
    except BotoCoreError as exc:
        raise UserError(f"cannot reach ECR: {exc}", "check the region and the network") from None
    username, _, password = base64.b64decode(token["authorizationToken"]).decode().partition(":")
    uri = repo["repositoryUri"]
    return RegistryLogin(uri.split("/", 1)[0], username, password), uri


def artifact_registry_login(region: str, project: str, repository: str, image_name: str) -> tuple[RegistryLogin, str]:
    """(login, image URI) for Artifact Registry from Application Default Credentials."""
    import google.auth
    import google.auth.transport.requests
    from google.auth.exceptions import DefaultCredentialsError, RefreshError

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
    except (DefaultCredentialsError, RefreshError) as exc:
        raise UserError(f"no Google credentials for Artifact Registry: {exc}", "run `gcloud auth application-default login`") from None
    host = f"{region}-docker.pkg.dev"
    return RegistryLogin(host, "oauth2accesstoken", credentials.token), f"{host}/{project}/{repository}/{image_name}"


def _transport(uri: str) -> tuple[str, bool]:
    """(the reference to talk to, whether TLS is verified): the stand-in endpoint when one is set."""
    endpoint = os.environ.get(REGISTRY_ENDPOINT_ENV)
    if not endpoint:
        return uri, True
    return f"{endpoint}/{uri.split('/', 1)[1]}", False


# Without a terminal skopeo says "Copying blob X" for every layer; only its debug log says which it skipped.
_BLOB = re.compile(r"^Copying blob (?:sha256:)?([0-9a-f]{12})")
_SKIPPED = re.compile(r".*Skipping blob (?:sha256:)?([0-9a-f]{12})[0-9a-f]* \(already present\)")
# docker push: one line per layer as it finishes.
_DOCKER_LAYER = re.compile(r"^([0-9a-f]{12}): (Pushed|Layer already exists|Mounted from .*)$")
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def copy_image(source: str, uri: str, login: RegistryLogin, *, say: Callable[[str], None] = lambda _: None, engine: Tool | None = None) -> PushResult:
    """Copy a local image of ENGINE's store to URI with skopeo (else ENGINE's push), one line per layer."""
    started = time.monotonic()
    target, verify = _transport(uri)
    with tempfile.TemporaryDirectory(prefix="cloudllm-push-") as tmp:
        digest_file = Path(tmp) / "digest"
        auth_file = Path(tmp) / "config.json"  # containers-auth.json and docker's config.json share this shape
        _write_auth(auth_file, target.split("/", 1)[0], login)
        env = None
        engine = engine or find_builder()
        skopeo = shutil.which("skopeo") if engine.name != "docker" else None  # skopeo reads containers-storage, not docker's
        if skopeo:
            tool = Tool("skopeo", skopeo)
            command = [skopeo, "--debug", "copy", "--authfile", str(auth_file), f"--dest-tls-verify={str(verify).lower()}",
                       "--digestfile", str(digest_file), f"containers-storage:{source}", f"docker://{target}"]
        else:
            tool = engine
            if tool.name == "docker":
                # docker's CLI knows neither an auth file nor TLS flags: its login is DOCKER_CONFIG's config.json,
                # and the daemon itself takes 127.0.0.0/8 registries over plain HTTP.
                tool.run("tag", source, target)
                env = {**os.environ, "DOCKER_CONFIG": tmp}
                command = [tool.path, "--log-level=debug", "push", target]
            else:
                command = [tool.path, "--log-level=debug", "push", "--authfile", str(auth_file), f"--tls-verify={str(verify).lower()}",
                           "--digestfile", str(digest_file), source, f"docker://{target}"]
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            sent, skipped, output = _follow_push(process, say)
        finally:
            if env is not None:
                tool.run("rmi", target, check=False)  # the tag made for the push; the image keeps its own name
        if process.returncode != 0:
            last = next((line for line in reversed(output) if line.strip()), "no output")
            if any(word in last.lower() for word in ("unauthorized", "authentication required", "denied", "401", "403")):
                raise DeployFailed(f"the registry refused the login for {uri}: {last[-300:]}", "check the credentials and their push permission")
            raise DeployFailed(f"pushing to {uri} failed: {last[-300:]}", "check the registry address and the network")
        digest = digest_file.read_text().strip() if digest_file.is_file() else manifest_digest(target, login, verify=verify)
    return PushResult(uri, digest, sent, skipped, round(time.monotonic() - started, 2), tool.name)


def _follow_push(process: subprocess.Popen, say: Callable[[str], None]) -> tuple[int, int, list[str]]:
    """(layers sent, layers skipped, output without debug lines) of a running push, saying one line per layer."""
    layers: list[str] = []
    skipped: set[str] = set()
    output: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        if "level=debug" not in line:
            output.append(line.rstrip())
        if match := _BLOB.match(line):
            layers.append(match.group(1))
        elif match := _SKIPPED.match(line):
            skipped.add(match.group(1))
            say(f"  layer {match.group(1)} already there")
        elif match := _DOCKER_LAYER.match(line.strip()):
            layers.append(match.group(1))
            if match.group(2) != "Pushed":
                skipped.add(match.group(1))
                say(f"  layer {match.group(1)} already there")
    process.wait()
    for layer in layers:
        if layer not in skipped:
            say(f"  layer {layer} sent")
    sent = len([layer for layer in layers if layer not in skipped])
    return sent, len(layers) - sent, output


def manifest_digest(reference: str, login: RegistryLogin, *, verify: bool = True) -> str:
    """The digest the registry holds under REFERENCE (host/repository:tag), from the Registry API v2.

    docker push prints it, but podman standing in for docker does not: the registry is the one
    answer both agree on. A Bearer challenge (Artifact Registry) is answered with the same login.
    """
    import httpx

    host, _, path = reference.partition("/")
    repository, _, tag = path.rpartition(":")
    url = f"{'https' if verify else 'http'}://{host}/v2/{repository}/manifests/{tag}"
    headers = {"Accept": ", ".join(MANIFEST_TYPES)}
    try:
        with httpx.Client(verify=verify, timeout=60) as client:
            answer = client.head(url, headers=headers, auth=(login.username, login.password))
            challenge = answer.headers.get("www-authenticate", "")
            if answer.status_code == 401 and challenge.lower().startswith("bearer "):
                fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
                params = {key: fields[key] for key in ("service", "scope") if key in fields}
                grant = client.get(fields.get("realm", ""), params=params, auth=(login.username, login.password)).json()
                token = grant.get("token") or grant.get("access_token")
                answer = client.head(url, headers={**headers, "Authorization": f"Bearer {token}"})
    except (httpx.HTTPError, ValueError) as exc:
        raise DeployFailed(f"cannot read back the digest of {reference}: {exc}", "check the registry address and the network") from None
    digest = answer.headers.get("docker-content-digest")
    if answer.status_code != 200 or not digest:
        raise DeployFailed(f"the registry did not say the digest of {reference} (HTTP {answer.status_code})", "push again; check the credentials' pull permission")
    return digest


def _write_auth(path: Path, registry: str, login: RegistryLogin) -> None:
    """A containers-auth.json for this one push, in a private temporary folder (never the user's)."""
    import json

    auth = base64.b64encode(f"{login.username}:{login.password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    path.chmod(0o600)


def push_image(
    image: str,
    *,
    provider: str,
    region: str,
    project: str | None = None,
    repository: str | None = None,
    profile: str | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> PushResult:
    """Push the local IMAGE to the provider's registry (ECR for sagemaker, Artifact Registry for vertex)."""
    engine = find_tool(("podman", "buildah", "docker"), None, "engine")
    local_id = image_id(engine, image)
    if local_id is None:
        raise UserError(f"image {image} is not in this machine's image store", "build it first with `cloudllm build`")
    name, tag = split_image(image)
    if provider == "sagemaker":
        login, repo_uri = ecr_login(region, repository or name, profile=profile, say=say)
        uri = f"{repo_uri}:{tag}"
    elif provider == "vertex":
        if not project:
            raise UserError("pushing to Artifact Registry needs a project", "pass --project")
        login, image_uri = artifact_registry_login(region, project, repository or DEFAULT_AR_REPOSITORY, name)
        uri = f"{image_uri}:{tag}"
    else:
        raise UserError(f"cannot push to provider {provider!r}", "pass --provider sagemaker (ECR) or vertex (Artifact Registry)")
    say(f"pushing {image} to {uri}")
    # skopeo wants a fully qualified name or the id; the id is what was checked above.
    return copy_image(local_id if engine.name != "docker" else image, uri, login, say=say, engine=engine)
