"""The one table of model types TGI serves with its own kernels, for every cloud that offers a TGI image.

Text-only model types of TGI's ModelType enum (server/text_generation_server/models/__init__.py):
these get the TGI container by default on a GPU; anything else gets the generated handler. One
table for SageMaker and Vertex AI, so a model's default runtime does not depend on the cloud.
"""

TGI_MODEL_TYPES = frozenset(
    "baichuan bloom cohere dbrx deepseek_v2 deepseek_v3 falcon gemma gemma2 gemma3_text gpt2 gpt_bigcode "
    "gpt_neox gptj granite llama mistral mixtral mpt opt phi phi3 phimoe qwen2 qwen2_moe qwen3 qwen3_moe "
    "RefinedWeb RefinedWebModel santacoder starcoder2".split()
)
