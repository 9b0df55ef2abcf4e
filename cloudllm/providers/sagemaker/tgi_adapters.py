"""LoRA adapters of the tgi runtime on SageMaker: they ride in the model, read by TGI when it starts.

TGI takes its adapters from LORA_ADAPTERS, `name=path` pairs separated by commas
(text_generation_server/utils/adapter.py, parse_lora_adapters), and loads them once, at start.
Each adapter's files are uploaded content-addressed (<artifact root>/adapters/<digest>/, as the
vllm runtime's adapter components use them) and mounted in the container as one
AdditionalModelDataSource: SageMaker copies channel NAME to
/opt/ml/additional-model-data-sources/NAME/. CreateModel takes at most five such sources, so a
tgi model holds at most five adapters.

TGI answers a request for an adapter it does not hold with the base model and no error
(flash_causal_lm.py: ADAPTER_TO_INDEX.get(adapter_id, 0)), so invoke checks the name here first.

The vllm runtime's model (LMI) takes its adapters as adapter inference components, loaded live,
but only when its vLLM started with LoRA on: OPTION_ENABLE_LORA, OPTION_MAX_LORAS and
OPTION_MAX_LORA_RANK (at least 16, vLLM's default, so small adapters added later fit) go in its
environment whenever it is deployed on components. An adapter above that rank needs a new model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudllm.errors import UserError

if TYPE_CHECKING:
    from cloudllm.plan import Plan

LORA_ENV = "LORA_ADAPTERS"
CHANNEL_ROOT = "/opt/ml/additional-model-data-sources"
MAX_SOURCES = 5  # botocore: ContainerDefinition.AdditionalModelDataSources, max 5
LMI_RANK_ENV = "OPTION_MAX_LORA_RANK"
LMI_MIN_RANK = 16  # vLLM's default max_lora_rank
LMI_MIN_LORAS = 4  # adapters one batch may mix (OPTION_MAX_LORAS); more are swapped in from host memory


def lmi_lora_env(adapters) -> dict[str, str]:
    """LMI's LoRA settings for a base that serves adapter components (now or added later)."""
    from cloudllm.adapters import vllm_max_lora_rank

    rank = max(LMI_MIN_RANK, vllm_max_lora_rank(list(adapters)))
    return {"OPTION_ENABLE_LORA": "true", "OPTION_MAX_LORAS": str(max(LMI_MIN_LORAS, len(adapters))), LMI_RANK_ENV: str(rank)}


def check_tgi_adapters(plan: "Plan") -> None:
    """What SageMaker's CreateModel refuses for a tgi model's adapters, before anything is uploaded."""
    if plan.runtime != "tgi" or not plan.adapters:
        return
    if len(plan.adapters) > MAX_SOURCES:
        raise UserError(
            f"the tgi runtime on SageMaker mounts each adapter as a model data source, and a model takes at most {MAX_SOURCES} "
            f"({len(plan.adapters)} asked for)",
            f"pass at most {MAX_SOURCES} --adapter, or deploy with --runtime vllm (adapter inference components, no such limit)",
        )


def lora_adapters_value(names: list[str]) -> str:
    """LORA_ADAPTERS for adapters mounted as channels of their own names."""
    return ",".join(f"{name}={CHANNEL_ROOT}/{name}" for name in sorted(names))


def model_adapter_sources(model: dict) -> dict[str, str]:
    """{adapter name: S3 prefix} of a described model's adapters (its LORA_ADAPTERS and the channels they name)."""
    container = model.get("PrimaryContainer") or {}
    names = model_adapter_names(model)
    channels = {s["ChannelName"]: s["S3DataSource"]["S3Uri"] for s in container.get("AdditionalModelDataSources") or []}
    return {name: channels.get(name, "") for name in names}


def model_adapter_names(model: dict) -> list[str]:
    """The adapter names a described model's TGI loads: the ids in its LORA_ADAPTERS."""
    value = ((model.get("PrimaryContainer") or {}).get("Environment") or {}).get(LORA_ENV, "")
    return sorted(pair.split("=", 1)[0].strip() for pair in value.split(",") if pair.strip())


class TgiAdapters:
    """The tgi runtime's adapters in the model (mixed into SageMakerComponents)."""

    def _model_adapter_container(self, plan: "Plan", *, components: bool) -> dict[str, Any]:
        """PrimaryContainer fields for the plan's adapters (tgi only): each adapter uploaded, mounted, named in LORA_ADAPTERS."""
        if plan.runtime == "vllm" and components:
            return {"Environment": lmi_lora_env(plan.adapters)}
        if plan.runtime != "tgi" or not plan.adapters:
            return {}
        root = self._artifact_root(plan)
        sources = [
            {
                "ChannelName": adapter.name,
                "S3DataSource": {"S3Uri": self._upload_adapter(root, adapter), "S3DataType": "S3Prefix", "CompressionType": "None"},
            }
            for adapter in sorted(plan.adapters, key=lambda a: a.name)
        ]
        return {"AdditionalModelDataSources": sources, "Environment": {LORA_ENV: lora_adapters_value([a.name for a in plan.adapters])}}

    def _lmi_rank_fits(self, model_name: str, adapters) -> bool:
        """The LMI model started with LoRA on and a max rank that holds these adapters (else it needs a new model)."""
        env = (self._sm.describe_model(ModelName=model_name).get("PrimaryContainer") or {}).get("Environment") or {}
        return env.get("OPTION_ENABLE_LORA") == "true" and int(env.get(LMI_RANK_ENV) or 0) >= int(lmi_lora_env(adapters)[LMI_RANK_ENV])

    def _check_model_adapter(self, name: str, layout: dict, adapter: str) -> None:
        """Refuse a request for an adapter the endpoint's TGI does not hold (it would answer with the base model)."""
        if adapter in (layout.get("adapters") or ()):
            return
        fresh = self._layout(name, fresh=True) or layout  # the record may predate a deploy from elsewhere
        held = fresh.get("adapters") or []
        if adapter not in held:
            raise UserError(
                f"endpoint {name} has no adapter named {adapter} (TGI would answer with the base model instead)",
                f"use one of: {', '.join(held)}" if held else f"invoke without --adapter; deploy {name} with --adapter NAME=PATH to add one",
            )

    def _model_adapters(self, name: str, component: str) -> list[dict]:
        """`cloudllm adapters list` of a tgi endpoint: the adapters in its first model's component."""
        with self._aws(f"read the adapters of {name}"):
            described = self._describe_component(component)
            if described is None:
                return []
            model = self._sm.describe_model(ModelName=described["Specification"]["ModelName"])
        return [
            {"name": adapter, "rank": None, "digest": uri.rstrip("/").rsplit("/", 1)[-1], "status": described["InferenceComponentStatus"]}
            for adapter, uri in sorted(model_adapter_sources(model).items())
        ]
