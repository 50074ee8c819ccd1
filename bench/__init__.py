"""Benchmark harness: the same load direct, through this proxy, and through LiteLLM (`python -m bench`)."""
