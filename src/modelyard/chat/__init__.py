"""Prompt rendering with the model's own chat template."""
