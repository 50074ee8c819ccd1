"""proxy: a transparent OpenAI-compatible proxy with a cost-aware fallback chain."""

__version__ = "0.1.0"
