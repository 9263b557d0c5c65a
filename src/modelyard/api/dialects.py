"""Which API dialect a path speaks, for what answers before its endpoint runs (the key
check, the server's request limit, the pipeline's check-in and body read): Anthropic's
error shape on Anthropic's paths, SPEC.md's (OpenAI's) everywhere else."""

from __future__ import annotations

from modelyard.api.anthropic.errors import ANTHROPIC
from modelyard.api.errors import OPENAI, ErrorStyle

MESSAGES_PATHS = frozenset({"/v1/messages"})
COUNT_TOKENS_PATHS = frozenset({"/v1/messages/count_tokens"})
ANTHROPIC_PATHS = MESSAGES_PATHS | COUNT_TOKENS_PATHS


def error_style(path: str) -> ErrorStyle:
    return ANTHROPIC if path in ANTHROPIC_PATHS else OPENAI
