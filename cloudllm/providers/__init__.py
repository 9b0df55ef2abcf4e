"""Providers: one small module per platform behind the Provider interface (providers/base.py)."""

from cloudllm.providers.base import Endpoint, Feature, Provider, ResourceChange, get_provider, provider_names

__all__ = ["Endpoint", "Feature", "Provider", "ResourceChange", "get_provider", "provider_names"]
