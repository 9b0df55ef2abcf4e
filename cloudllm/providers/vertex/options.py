"""The options the Vertex AI provider reads (spec.options, --option KEY=VALUE, the deploy flags that fill them)."""

from __future__ import annotations

from pydantic import Field

from cloudllm.providers.kit import RolloutOptions


class VertexOptions(RolloutOptions):
    """Options of the vertex provider."""

    project: str | None = Field(
        None, description="Google Cloud project (--project; default GOOGLE_CLOUD_PROJECT, then Application Default Credentials')."
    )
    kms_key: str | None = Field(
        None, description="Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K) for the model, endpoint and artifacts."
    )
    dedicated_endpoint: bool | None = Field(
        None,
        description="Create the endpoint with a dedicated DNS (Vertex AI's dedicated_endpoint_enabled), which --add-model needs: "
        "Vertex AI reaches one model of several only through a dedicated endpoint's invoke route. Fixed once the endpoint exists; "
        "its requests then go to that DNS only.",
    )
