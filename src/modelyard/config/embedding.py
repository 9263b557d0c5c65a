"""The built-in embedding model's section ([embedding])."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict, field_validator
from pydantic.dataclasses import dataclass

from .base import (
    _FORBID,
    DEFAULT_EMBEDDING_ID,
    DEFAULT_EMBEDDING_SOURCE,
    Flag,
    NonEmpty,
    NonNegative,
    Positive,
    PriceUnits,
    Text,
    _price,
)


@dataclass(frozen=True, config=_FORBID)
class EmbeddingConfig:
    """The built-in embedding model ([embedding]): its own llama.cpp model, context and
    worker thread beside the chat engine's, answering /v1/embeddings."""

    enabled: Flag = True
    id: NonEmpty = DEFAULT_EMBEDDING_ID
    source: Text = DEFAULT_EMBEDDING_SOURCE
    """`pypi:all-minilm-l6-v2` (converted to GGUF at first start), or a GGUF path."""
    input_price: PriceUnits = 0.0
    """Currency units per million input tokens."""
    threads: NonNegative = 0
    """CPU threads of its llama.cpp context; 0 means one per core."""
    batch_size: Annotated[int, Strict(), Field(ge=64, le=65536)] = 512
    """Tokens encoded in one llama.cpp call (several requests' inputs together); an input
    may hold at most this many tokens, and at most the model's context. Every token of a
    call attends over the whole call (masked), so larger calls cost more per token: with
    all-MiniLM-L6-v2 and 64-token inputs on 2 cores, 256 and 512 encoded about 88 inputs/s,
    1024 74/s, 2048 21/s."""
    max_sequences: Annotated[int, Strict(), Field(ge=1, le=256)] = 64
    """Inputs encoded in one llama.cpp call."""
    max_waiting: Positive = 8192
    """Inputs allowed to wait for the model; past this the server answers 503."""
    truncatable: Flag = False
    """Whether `dimensions` below the model's own may be asked for (the vector's head,
    normalized again): only for models trained for it (Matryoshka); all-MiniLM-L6-v2 is
    not."""

    _prices = field_validator("input_price")(_price)
