"""The SageMaker provider: real-time endpoints from uncompressed S3 artifacts (see provider.py)."""

from cloudllm.providers.sagemaker.provider import SageMakerProvider

__all__ = ["SageMakerProvider"]
