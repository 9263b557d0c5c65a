"""The request of POST /v1/completions (OpenAI's legacy Completions, with DeepSeek's
fill-in-the-middle `suffix`): the fields chat shares (`GenerationRequest`) and a prompt."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from modelyard.api import bounds
from modelyard.api.errors import APIError
from modelyard.api.schema import GenerationRequest
from modelyard.providers.base import RawPrompt

MAX_PROMPTS = 128
"""Prompts in one request (each runs as a request of its own)."""
DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for a text completion that names no max_tokens."""

PromptText = Annotated[str, Field(max_length=bounds.MAX_MESSAGE_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=bounds.MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    prompt: PromptText | list[PromptText] | TokenIds | list[TokenIds]
    suffix: Annotated[str, Field(max_length=bounds.MAX_MESSAGE_CHARS)] | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    """The legacy form: how many likely alternatives to list for each token (0: none)."""
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None

    checked_arrays: ClassVar[frozenset[str]] = frozenset({"prompt"})

    @field_validator("prompt", mode="before")
    @classmethod
    def _small_enough(cls, value: Any) -> Any:
        # Before each item is validated: a list of millions would take seconds.
        if isinstance(value, list):
            if not value:
                raise APIError(422, "prompt must not be empty", param="prompt",
                               code="invalid_value")
            if len(value) > bounds.MAX_TOTAL_CHARS:
                raise APIError(422, f"a prompt has at most {bounds.MAX_TOTAL_CHARS} token ids",
                               param="prompt", code="invalid_value")
            if isinstance(value[0], str | list) and len(value) > MAX_PROMPTS:
                raise APIError(422, f"at most {MAX_PROMPTS} prompts, got {len(value)}",
                               param="prompt", code="invalid_value")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        size = sum(len(p) for p in self.prompts())
        if size > bounds.MAX_TOTAL_CHARS:
            raise APIError(422, f"the prompts have at most {bounds.MAX_TOTAL_CHARS} characters "
                           "or token ids in all", param="prompt", code="invalid_value")
        if self.best_of is not None:
            if self.best_of < self.choices:
                raise APIError(422, f"best_of ({self.best_of}) must be at least n "
                               f"({self.choices})", param="best_of", code="invalid_value")
            if self.stream and self.best_of > self.choices:
                raise APIError(422, "best_of cannot be used with stream: true",
                               param="best_of", code="invalid_value")
        if self.echo and self.logprobs is not None:
            raise APIError(422, "echo with logprobs would need the prompt's log-probabilities, "
                           "which this server does not compute; drop one of them",
                           param="echo", code="unsupported_parameter")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: its text, or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [[item for item in prompt if isinstance(item, int)]]
        return [item for item in prompt if isinstance(item, str | list)]

    def raw_prompts(self) -> list[RawPrompt]:
        return [RawPrompt(text=p, suffix=self.suffix, echo=self.echo) if isinstance(p, str)
                else RawPrompt(token_ids=tuple(p), suffix=self.suffix, echo=self.echo)
                for p in self.prompts()]

    @property
    def generated_choices(self) -> int:
        """Choices generated per prompt: best_of of them, n returned."""
        return self.best_of or self.choices

    @property
    def max_completion(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

