"""The Vertex AI provider: artifacts on GCS, a Model in the registry, an Endpoint serving it.

    deploy:  upload gs://BUCKET/PREFIX/<name>/<version>/  ->  UploadModel  ->  CreateEndpoint  ->  DeployModel
    update:  upload the new version  ->  UploadModel(parent_model=...)  ->  DeployModel beside the old one,
             without traffic  ->  all traffic to it, or canary: PCT% to it, bake (--option
             rollout_wait=SECONDS, default 300), check that it answers sample requests, then
             the rest (a failing canary moves the traffic back and undeploys it)  ->  UndeployModel the old one
    delete:  UndeployModel each  ->  DeleteModel  ->  DeleteEndpoint  [->  delete the artifacts]

Runtimes: `tgi` (Hugging Face TGI DLC; it copies AIP_STORAGE_URI itself; NUM_SHARD = the
GPUs the model's attention heads split over), `vllm` (the Vertex Model Garden vLLM image,
`--model=gs://...`, tensor parallel over as many GPUs) and `handler` (the generated server in
the HF PyTorch inference DLC: a short bootstrap copies the artifact, then runs code/serve.py).
Images come from cloudllm/catalog/vertex_images.py; `--image` overrides them.

Streaming (streamRawPredict, which Vertex forwards to the container's predict route as is):
the handler answers TGI's server-sent events; the Model Garden vLLM server takes
{"instances": [{"prompt", "stream": true, ...}]} and answers NUL-separated JSON objects
{"predictions": [text]}; TGI's Vertex route (AIP_PREDICT_ROUTE) only answers whole
predictions, so `--stream` is refused for tgi endpoints.

Every long-running operation is waited on with our own deadline (--timeout, or sized from
the model's bytes), never google-api-core's 900 s default, polling less often as it goes.
When that deadline passes the operation goes on in Vertex AI, which refuses to delete what
an operation is still changing: nothing is cleaned up, and the error says how to follow it
and how to remove it afterwards.
The plan's digests are stored as labels on each model version (base32, so a sha256 fits a
label value) and read back by get(), which is how an unchanged deploy is a no-op.

Credentials are Application Default Credentials; the project comes from --project,
GOOGLE_CLOUD_PROJECT or ADC, the region from --region (default us-central1).

Environment:
    CLOUDLLM_VERTEX_ENDPOINT  Base URL of the Vertex AI API, e.g. http://127.0.0.1:8090 for
                              `cloudllm emulate vertex`. When set, every Vertex call (REST) and
                              streamRawPredict go there with anonymous credentials.
    STORAGE_EMULATOR_HOST     google-cloud-storage's own variable: artifacts go to that emulator.

The package: provider.py holds the verbs; session.py (project, clients, retries, waits),
checks.py (plan -> settings, validation), versions.py (artifacts, model, container, deployed
model), rollout.py (lock, canary, traffic), cleanup.py (undo, delete), invoke.py (requests,
logs), labels.py (what cloudllm writes on resources), bootstrap.py (the handler's entry point in
the container).
"""

from cloudllm.providers.vertex.checks import deployment_timeout
from cloudllm.providers.vertex.invoke import vertex_request
from cloudllm.providers.vertex.labels import decode_digest, encode_digest
from cloudllm.providers.vertex.provider import VertexProvider
from cloudllm.providers.vertex.session import API_ENDPOINT_ENV
from cloudllm.providers.vertex.versions import HANDLER_BOOTSTRAP

__all__ = ["API_ENDPOINT_ENV", "HANDLER_BOOTSTRAP", "VertexProvider", "deployment_timeout", "encode_digest", "decode_digest", "vertex_request"]
