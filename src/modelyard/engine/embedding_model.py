"""An embedding model in llama.cpp: its own model and context in embedding mode.

Separate from the chat engine's `LlamaRunner` (its own weights, context and thread), so
embedding requests never wait on chat decoding, nor the other way round. One `encode`
call runs several inputs at once, one sequence id each, and reads back each sequence's
pooled vector (the pooling stored in the GGUF: mean for sentence-transformers models),
L2-normalized as OpenAI's embeddings are.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import numpy.typing as npt

from modelyard.engine.compute_thread import on_compute_thread
from modelyard.engine.runner import RunnerError, _init_backend, model_params

MAX_SEQUENCES = 256
"""llama.cpp's own limit of sequence ids in one context (LLAMA_MAX_SEQ)."""


@dataclass(frozen=True)
class EmbeddingModelConfig:
    model_path: Path
    batch_tokens: int
    """Most tokens one `encode` call carries (all its inputs together)."""
    max_sequences: int = 64
    """Most inputs one `encode` call carries."""
    threads: int = 0
    """0: one per core."""


class LlamaEmbeddingModel:
    """Tokenize and encode with llama.cpp; not thread-safe: one thread encodes (`tokenize`
    only reads the vocabulary and may run anywhere)."""

    def __init__(self, config: EmbeddingModelConfig) -> None:
        _init_backend()
        self.config = config
        threads = config.threads or (os.cpu_count() or 1)
        self._model = llama_cpp.llama_model_load_from_file(
            str(config.model_path).encode(), model_params(0))
        if not self._model:
            raise RunnerError(f"llama.cpp could not load the embedding model at "
                              f"{config.model_path}")
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self.max_input_tokens = min(self.n_ctx_train, config.batch_tokens)
        """The longest input: the model's positions, and one `encode` call."""
        self.max_sequences = min(config.max_sequences, MAX_SEQUENCES)
        params = llama_cpp.llama_context_default_params()
        # An encoder keeps no KV cache between calls; the whole batch is one ubatch
        # (non-causal attention needs every token of a sequence in the same ubatch).
        params.n_ctx = config.batch_tokens
        params.n_batch = config.batch_tokens
        params.n_ubatch = config.batch_tokens
        params.n_seq_max = self.max_sequences
        params.embeddings = True
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise RunnerError("llama.cpp could not create the embedding context")
        if llama_cpp.llama_pooling_type(self._ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            self.close()
            raise RunnerError(f"{config.model_path} has no pooling: not an embedding model")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.dimensions = int(llama_cpp.llama_model_n_embd(self._model))
        self._allocate_batch(config.batch_tokens)

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens for `text`, its special tokens added ([CLS] ... [SEP]);
        special tokens written in the text stay text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, True,
                                     False)
        if n < 0:
            capacity = -n
            buffer = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                         True, False)
        return list(buffer[:n])

    def encode(self, inputs: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """One pooled, L2-normalized vector per input (a row each), in one llama.cpp call.
        The inputs together must fit `batch_tokens` and `max_sequences`."""
        total = sum(len(tokens) for tokens in inputs)
        if not inputs or total > self.config.batch_tokens or \
                len(inputs) > self.max_sequences or any(not tokens for tokens in inputs):
            raise RunnerError(f"cannot encode {len(inputs)} inputs of {total} tokens")
        n = 0
        for seq, tokens in enumerate(inputs):
            end = n + len(tokens)
            self._tokens[n:end] = tokens
            self._positions[n:end] = self._counting[:len(tokens)]
            self._seq_id_pointers[n:end] = self._seq_ids_address + 4 * seq
            n = end
        batch = self._batch
        batch.n_tokens = n
        status = on_compute_thread(llama_cpp.llama_encode, self._ctx, batch)
        if status != 0:
            raise RunnerError(f"llama_encode failed with status {status}")
        vectors = np.empty((len(inputs), self.dimensions), dtype=np.float32)
        for seq in range(len(inputs)):
            pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:
                raise RunnerError(f"llama.cpp returned no embedding for sequence {seq}")
            vectors[seq] = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                shape=(self.dimensions,))
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        normalized: npt.NDArray[np.float32] = vectors / np.maximum(norms, 1e-12)
        return normalized

    def _allocate_batch(self, n_tokens: int) -> None:
        """The batch's arrays as numpy buffers owned here (filled by slices, not a Python
        loop per token); every token is an output of the pooling."""
        self._tokens = np.zeros(n_tokens, dtype=np.int32)
        self._positions = np.zeros(n_tokens, dtype=np.int32)
        self._counting = np.arange(n_tokens, dtype=np.int32)
        self._n_seq_id = np.ones(n_tokens, dtype=np.int32)
        self._outputs = np.ones(n_tokens, dtype=np.int8)
        self._seq_ids = np.arange(self.max_sequences, dtype=np.int32)
        self._seq_ids_address = self._seq_ids.ctypes.data
        self._seq_id_pointers = np.zeros(n_tokens, dtype=np.uint64)
        self._batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=ctypes.POINTER(ctypes.c_float)(),
            pos=self._positions.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_id_pointers.ctypes.data,
                               ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            logits=self._outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None
