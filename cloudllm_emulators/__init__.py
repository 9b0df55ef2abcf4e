"""Offline stand-ins for the clouds (`cloudllm emulate ...`): real APIs on loopback, for tests and CI."""
