"""modelyard: a self-hosted, OpenAI-compatible LLM API platform."""

__version__ = "0.1.0"
