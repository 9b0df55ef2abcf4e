"""Providers: one module or package per platform behind the Provider interface (providers/base.py), built on providers/kit/."""

from cloudllm.providers.base import Endpoint, Feature, Fingerprint, Provider, ResourceChange, get_provider, provider_names

__all__ = ["Endpoint", "Feature", "Fingerprint", "Provider", "ResourceChange", "get_provider", "provider_names"]
