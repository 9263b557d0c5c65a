"""The packaged all-MiniLM-L6-v2, converted and run in llama.cpp: its tokenizer, its
vectors, and batching that changes nothing."""

from __future__ import annotations

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
