"""Converting a sentence-transformers BERT checkpoint to GGUF, with a tiny made-up one, and
the packaged source's reuse and reconversion."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from modelyard.models import embedding_sources
from modelyard.models.bert_gguf import ConversionError, convert_bert, read_safetensors
from modelyard.models.embedding_sources import (
    PackagedEmbedding,
    converted,
    resolve_embedding_source,
)
from modelyard.models.sources import ModelSourceError

HIDDEN, HEADS, FF, LAYERS, POSITIONS = 16, 2, 32, 2, 32
WORDS = ["hello", "world", "##s", "cat", "the", "mat"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs = []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[array.dtype]
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def tiny_checkpoint(directory: Path, pooling: str = "pooling_mode_mean_tokens") -> Path:
    rng = np.random.default_rng(0)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": weights(len(VOCAB), HIDDEN),
        "embeddings.position_embeddings.weight": weights(POSITIONS, HIDDEN),
        "embeddings.token_type_embeddings.weight": weights(2, HIDDEN),
        "embeddings.LayerNorm.weight": np.ones(HIDDEN, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(HIDDEN, np.float32),
        "embeddings.position_ids": np.arange(POSITIONS, dtype=np.int64)[None, :],
        "pooler.dense.weight": weights(HIDDEN, HIDDEN),
        "pooler.dense.bias": weights(HIDDEN),
    }
    for i in range(LAYERS):
        block = f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            tensors[f"{block}.attention.self.{part}.weight"] = weights(HIDDEN, HIDDEN)
            tensors[f"{block}.attention.self.{part}.bias"] = weights(HIDDEN)
        tensors[f"{block}.attention.output.dense.weight"] = weights(HIDDEN, HIDDEN)
        tensors[f"{block}.attention.output.dense.bias"] = weights(HIDDEN)
        tensors[f"{block}.attention.output.LayerNorm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[f"{block}.attention.output.LayerNorm.bias"] = np.zeros(HIDDEN, np.float32)
        tensors[f"{block}.intermediate.dense.weight"] = weights(FF, HIDDEN)
        tensors[f"{block}.intermediate.dense.bias"] = weights(FF)
        tensors[f"{block}.output.dense.weight"] = weights(HIDDEN, FF)
        tensors[f"{block}.output.dense.bias"] = weights(HIDDEN)
        tensors[f"{block}.output.LayerNorm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[f"{block}.output.LayerNorm.bias"] = np.zeros(HIDDEN, np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "intermediate_size": FF, "num_hidden_layers": LAYERS,
        "max_position_embeddings": POSITIONS, "vocab_size": len(VOCAB),
        "type_vocab_size": 2, "layer_norm_eps": 1e-12}))
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (directory / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": i, "content": t, "special": True}
                         for i, t in enumerate(VOCAB[:5])],
        "normalizer": {"type": "BertNormalizer", "lowercase": True, "strip_accents": None}}))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({pooling: True}))
    return directory


def field_value(reader: gguf.GGUFReader, key: str) -> object:
    found = reader.get_field(key)
    assert found is not None, key
    return found.contents()


def test_a_checkpoint_becomes_a_bert_gguf(tmp_path: Path) -> None:
    target = tmp_path / "tiny.gguf"
    convert_bert(tiny_checkpoint(tmp_path / "ckpt"), target)
    reader = gguf.GGUFReader(target)
    assert field_value(reader, "general.architecture") == "bert"
    assert field_value(reader, "bert.block_count") == LAYERS
    assert field_value(reader, "bert.embedding_length") == HIDDEN
    assert field_value(reader, "bert.context_length") == POSITIONS
    assert field_value(reader, "bert.attention.causal") is False
    assert field_value(reader, "bert.pooling_type") == 1  # mean
    assert field_value(reader, "tokenizer.ggml.model") == "bert"
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    assert tokens == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2581hello",
                      "\u2581world", "s", "\u2581cat", "\u2581the", "\u2581mat"]
    assert field_value(reader, "tokenizer.ggml.token_type") == [3] * 5 + [1] * 6
    assert field_value(reader, "tokenizer.ggml.bos_token_id") == 2
    assert field_value(reader, "tokenizer.ggml.seperator_token_id") == 3
    assert field_value(reader, "tokenizer.ggml.padding_token_id") == 0
    assert field_value(reader, "tokenizer.ggml.add_bos_token") is True
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "pooler.dense.weight" not in types and len(types) == 5 + 16 * LAYERS
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    for name in ("position_embd.weight", "token_types.weight", "token_embd_norm.weight",
                 "blk.0.attn_q.bias", "blk.0.attn_output_norm.weight",
                 "blk.1.layer_output_norm.bias"):
        assert types[name] == gguf.GGMLQuantizationType.F32, name


def test_the_pooling_comes_from_the_pooling_module(tmp_path: Path) -> None:
    target = tmp_path / "cls.gguf"
    convert_bert(tiny_checkpoint(tmp_path / "ckpt", "pooling_mode_cls_token"), target)
    assert field_value(gguf.GGUFReader(target), "bert.pooling_type") == 2


def test_the_tiny_model_runs_in_llama_cpp(tmp_path: Path) -> None:
    from modelyard.engine.embedding_model import EmbeddingModelConfig, LlamaEmbeddingModel

    target = tmp_path / "tiny.gguf"
    convert_bert(tiny_checkpoint(tmp_path / "ckpt"), target)
    model = LlamaEmbeddingModel(EmbeddingModelConfig(target, batch_tokens=64))
    try:
        assert model.tokenize("Hello worlds") == [2, 5, 6, 7, 3]  # lowercased, ## pieces
        vectors = model.encode([[2, 5, 3], [2, 8, 9, 10, 3]])
        assert vectors.shape == (2, HIDDEN)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    finally:
        model.close()


def test_a_checkpoint_that_is_not_bert_is_refused(tmp_path: Path) -> None:
    directory = tiny_checkpoint(tmp_path / "ckpt")
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="llama"):
        convert_bert(directory, tmp_path / "x.gguf")


def test_a_truncated_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, {"a": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ConversionError, match="do not hold"):
        list(read_safetensors(path))


class CountingConverter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, directory: Path, target: Path) -> None:
        self.calls += 1
        convert_bert(directory, target)


def test_converted_once_and_again_when_the_source_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tiny_checkpoint(tmp_path / "ckpt")
    counter = CountingConverter()
    monkeypatch.setattr(embedding_sources, "convert_bert", counter)
    target = tmp_path / "models" / "tiny.gguf"
    assert converted(directory, target) == target
    assert converted(directory, target) == target
    assert counter.calls == 1
    (directory / "vocab.txt").write_text("\n".join([*VOCAB[:-1], "rug"]) + "\n")
    converted(directory, target)
    assert counter.calls == 2
    assert not list(target.parent.glob(".*partial"))


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    directory = tiny_checkpoint(tmp_path / "ckpt")
    (directory / "vocab.txt").write_text("[PAD]\n")
    target = tmp_path / "models" / "tiny.gguf"
    with pytest.raises(ModelSourceError, match=r"vocab\.txt has 1 tokens"):
        converted(directory, target)
    assert list(target.parent.iterdir()) == []


def test_unknown_and_missing_packaged_models(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelSourceError, match=r"known: pypi:all-minilm-l6-v2"):
        resolve_embedding_source("pypi:nope", tmp_path)
    monkeypatch.setitem(embedding_sources.PACKAGED_EMBEDDINGS, "ghost", PackagedEmbedding(
        "ghost", "no_such_package_here", "data", "ghost.gguf"))
    with pytest.raises(ModelSourceError, match=r"pip install no-such-package-here"):
        resolve_embedding_source("pypi:ghost", tmp_path)


def test_a_gguf_path_is_used_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "mine.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_embedding_source(str(path), tmp_path / "models") == path.resolve()
