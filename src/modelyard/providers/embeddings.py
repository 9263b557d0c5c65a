"""Embedding models as the HTTP layer sees them: the built-in one and upstream ones.

An `EmbeddingRequest` (validated at the edge) is first `prepare`d: its tokens counted
(exactly by the built-in model, which tokenizes it; as an upper bound for an upstream,
whose tokenizer is not ours), and every refusal raised (an input longer than the model's
context, token ids outside its vocabulary, a `dimensions` it cannot give), so the
platform can admit it for its cost before anything runs. `embed` then runs it and
answers with one vector per input and the tokens it really used.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from modelyard.engine.embedder import Embedder, EmbedderFull, EmbedderStopped
from modelyard.providers.base import ProviderError

W = TypeVar("W")
Vectors = npt.NDArray[np.float32]
EncodingFormat = Literal["float", "base64"]

INPUT_OVERHEAD_TOKENS = 8
"""What a tokenizer adds around one text input (its special tokens), at most."""
RETRY_AFTER_SECONDS = 1
_INLINE_TOKENIZE_CHARS = 16 * 1024
"""Texts up to this size in all are tokenized on the event loop (cheaper than a thread)."""


@dataclass(frozen=True)
class EmbeddingRequest:
    request_id: str
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    """Texts, or token id lists (never mixed)."""
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    user: str | None = None

    @property
    def tokenized(self) -> bool:
        return bool(self.inputs) and not isinstance(self.inputs[0], str)


@dataclass(frozen=True)
class PreparedEmbedding(Generic[W]):
    """A request its model has read: what the platform reserves for, and the model's own
    work (`W`: token ids, an upstream body)."""

    request: EmbeddingRequest
    prompt_tokens: int
    """Exact (the built-in model) or an upper bound (an upstream): what is reserved."""
    work: W
    model: EmbeddingModel[W]

    async def embed(self) -> Embeddings:
        """Run it on the model that prepared it."""
        return await self.model.embed(self)


class Prepared(Protocol):
    """A `PreparedEmbedding` of any model, as the HTTP layer sees it."""

    @property
    def request(self) -> EmbeddingRequest: ...

    @property
    def prompt_tokens(self) -> int: ...

    async def embed(self) -> Embeddings: ...


class EmbeddingService(Protocol):
    """An embedding model as the HTTP layer sees it, whatever its work type."""

    model_id: str

    def describe(self) -> dict[str, Any]: ...

    async def prepare(self, request: EmbeddingRequest) -> Prepared: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Embeddings:
    vectors: Vectors
    """One row per input, in order."""
    prompt_tokens: int
    estimated: bool = False
    """Counted by modelyard (an upstream that reported no usage)."""


class EmbeddingModel(ABC, Generic[W]):
    """Answers embedding requests for one model id; `W` is what it prepares a request
    into."""

    model_id: str

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Extra fields of the model's entry in /v1/models."""

    @abstractmethod
    async def prepare(self, request: EmbeddingRequest) -> PreparedEmbedding[W]:
        """Count the tokens; raise ProviderError for what cannot run."""

    @abstractmethod
    async def embed(self, prepared: PreparedEmbedding[W]) -> Embeddings:
        """Run it (ProviderError when it cannot: overloaded, shutting down)."""

    async def close(self) -> None:
        """Release resources at shutdown."""


def utf8_bound(texts: Sequence[str]) -> int:
    """An upper bound of the tokens of `texts` for any tokenizer: no token is shorter than
    one UTF-8 byte, plus the special tokens around each input."""
    return sum(len(text.encode("utf-8")) + INPUT_OVERHEAD_TOKENS for text in texts)


class Tokenizes(Protocol):
    n_vocab: int
    max_input_tokens: int

    def tokenize(self, text: str) -> list[int]: ...


TokenIds = list[list[int]]


class LocalEmbeddings(EmbeddingModel[TokenIds]):
    """The built-in embedding model: its own tokenizer, its own worker (`Embedder`)."""

    def __init__(self, model_id: str, tokenizer: Tokenizes, embedder: Embedder, *,
                 truncatable: bool = False) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.truncatable = truncatable

    @property
    def dimensions(self) -> int:
        return self.embedder.dimensions

    def describe(self) -> dict[str, Any]:
        return {"task": "embedding", "context_length": self.tokenizer.max_input_tokens,
                "dimensions": self.dimensions}

    async def prepare(self, request: EmbeddingRequest) -> PreparedEmbedding[TokenIds]:
        self._check_dimensions(request.dimensions)
        limit = self.tokenizer.max_input_tokens
        if request.tokenized:
            ids = [list(tokens) for tokens in request.inputs if not isinstance(tokens, str)]
            vocabulary = self.tokenizer.n_vocab
            for i, tokens in enumerate(ids):
                if any(not 0 <= token < vocabulary for token in tokens):
                    raise ProviderError(422, f"input[{i}] holds a token id outside the "
                                        f"model's vocabulary (0 to {vocabulary - 1})",
                                        param="input", code="invalid_token_id")
        else:
            texts = [text for text in request.inputs if isinstance(text, str)]
            if sum(len(text) for text in texts) <= _INLINE_TOKENIZE_CHARS:
                ids = [self.tokenizer.tokenize(text) for text in texts]
            else:
                ids = await asyncio.to_thread(lambda: [self.tokenizer.tokenize(t)
                                                       for t in texts])
        for i, tokens in enumerate(ids):
            if len(tokens) > limit:
                raise ProviderError(422, f"input[{i}] has {len(tokens)} tokens; this model "
                                    f"embeds at most {limit} tokens per input",
                                    param="input", code="context_length_exceeded")
            if not tokens:
                raise ProviderError(422, f"input[{i}] is empty", param="input")
        return PreparedEmbedding(request, sum(len(tokens) for tokens in ids), ids, self)

    def _check_dimensions(self, dimensions: int | None) -> None:
        native = self.dimensions
        if dimensions is None or dimensions == native:
            return
        if not self.truncatable:
            raise ProviderError(422, f"{self.model_id} gives {native} dimensions only; "
                                "leave dimensions out", param="dimensions",
                                code="unsupported_dimensions")
        if not 1 <= dimensions <= native:
            raise ProviderError(422, f"dimensions must be 1 to {native} for {self.model_id}",
                                param="dimensions", code="unsupported_dimensions")

    async def embed(self, prepared: PreparedEmbedding[TokenIds]) -> Embeddings:
        try:
            vectors = await self.embedder.embed(prepared.work)
        except EmbedderFull as exc:
            raise ProviderError(503, "the embedding model is overloaded; retry shortly",
                                code="server_overloaded",
                                retry_after=RETRY_AFTER_SECONDS) from exc
        except EmbedderStopped as exc:
            raise ProviderError(503, "the server is shutting down", code="shutting_down",
                                retry_after=RETRY_AFTER_SECONDS) from exc
        dimensions = prepared.request.dimensions
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = truncate(vectors, dimensions)
        return Embeddings(vectors, prepared.prompt_tokens)

    async def close(self) -> None:
        await self.embedder.close()


def truncate(vectors: Vectors, dimensions: int) -> Vectors:
    """The first `dimensions` of each vector, normalized again (Matryoshka-style)."""
    head = vectors[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    normalized: Vectors = (head / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalized
