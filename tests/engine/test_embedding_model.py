"""The packaged all-MiniLM-L6-v2, converted and run in llama.cpp: its tokenizer, its
vectors (against a numpy forward pass of the checkpoint itself), and batching that
changes nothing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelyard.engine.embedding_model import EmbeddingModelConfig, LlamaEmbeddingModel
from modelyard.models.embedding_sources import resolve_embedding_source


@pytest.fixture(scope="module")
def model(data_dir: Path) -> Iterator[LlamaEmbeddingModel]:
    path = resolve_embedding_source("pypi:all-minilm-l6-v2", data_dir / "models")
    loaded = LlamaEmbeddingModel(EmbeddingModelConfig(path, batch_tokens=1024,
                                                      max_sequences=16))
    yield loaded
    loaded.close()


def test_its_shape(model: LlamaEmbeddingModel) -> None:
    assert (model.dimensions, model.n_vocab, model.n_ctx_train) == (384, 30522, 512)
    assert model.max_input_tokens == 512


def test_its_tokenizer_is_bert_uncased(model: LlamaEmbeddingModel) -> None:
    # [CLS] hello world [SEP], as the Hugging Face tokenizer gives them; lowercased,
    # accents stripped; "[SEP]" written in the text stays text.
    assert model.tokenize("Hello world") == [101, 7592, 2088, 102]
    assert model.tokenize("HÉLLO world") == [101, 7592, 2088, 102]
    assert 102 not in model.tokenize("a [SEP] b")[1:-1]


def test_a_paraphrase_is_nearer_than_an_unrelated_sentence(
        model: LlamaEmbeddingModel) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.",
             "Quarterly revenue grew by eight percent."]
    vectors = model.encode([model.tokenize(t) for t in texts])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert paraphrase > 0.6 and unrelated < 0.2


def test_a_batch_gives_what_each_input_gives_alone(model: LlamaEmbeddingModel) -> None:
    inputs = [model.tokenize(t) for t in ("short", "a somewhat longer sentence here",
                                          "x " * 200)]
    together = model.encode(inputs)
    for tokens, row in zip(inputs, together, strict=True):
        alone = model.encode([tokens])[0]  # the same up to float rounding of other shapes
        assert np.allclose(alone, row, atol=1e-3) and alone @ row > 0.9999


def reference_embedding(tokens: list[int]) -> np.ndarray:
    """all-MiniLM-L6-v2 computed in numpy from the packaged safetensors (float32, BERT as
    Hugging Face runs it: erf GELU, post-norm, mean pooling): what the GGUF must match."""
    from modelyard.models.bert_gguf import read_safetensors
    from modelyard.models.embedding_sources import PACKAGED_EMBEDDINGS, checkpoint_dir

    directory = checkpoint_dir(PACKAGED_EMBEDDINGS["all-minilm-l6-v2"])
    w = {name: np.asarray(t, np.float32)
         for name, t in read_safetensors(directory / "model.safetensors")}
    erf = np.vectorize(math.erf)

    def norm(x: np.ndarray, prefix: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def dense(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    n = len(tokens)
    x = (w["embeddings.word_embeddings.weight"][tokens]
         + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    heads, size = 12, 32
    for i in range(6):
        block = f"encoder.layer.{i}"
        q, k, v = (dense(x, f"{block}.attention.self.{part}").reshape(n, heads, size)
                   .transpose(1, 0, 2) for part in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True) @ v).transpose(1, 0, 2)
        x = norm(x + dense(attended.reshape(n, heads * size),
                           f"{block}.attention.output.dense"),
                 f"{block}.attention.output.LayerNorm")
        hidden = dense(x, f"{block}.intermediate.dense")
        hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))
        x = norm(x + dense(hidden, f"{block}.output.dense"), f"{block}.output.LayerNorm")
    pooled = x.mean(0)
    normalized: np.ndarray = pooled / np.linalg.norm(pooled)
    return normalized


def test_the_gguf_computes_what_the_checkpoint_does(model: LlamaEmbeddingModel) -> None:
    for text in ("Hello world", "The quick brown fox jumps over the lazy dog.",
                 "Embeddings map sentences to vectors; similar meanings lie close."):
        tokens = model.tokenize(text)
        ours = model.encode([tokens])[0]
        assert float(ours @ reference_embedding(tokens)) > 0.9999  # F16 weights: 0.999999 seen
