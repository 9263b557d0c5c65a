"""The memory estimate of a GGUF model, read from its header (a small file written here)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from modelyard.models.gguf_memory import read_shape
from modelyard.models.sources import ModelSourceError


def write_model(path: Path, head_count_kv: int | list[int]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(4)
    writer.add_embedding_length(256)
    writer.add_head_count(8)
    writer.add_head_count_kv(head_count_kv)
    writer.add_key_length(64)
    writer.add_value_length(32)
    writer.add_token_list([f"t{i}" for i in range(1000)])
    writer.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_estimate_is_the_file_the_kv_cache_and_the_logits(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_model(path, 2)
    shape = read_shape(path)
    assert (shape.n_layer, shape.n_vocab) == (4, 1000)
    assert shape.kv_values_per_token == 4 * 2 * (64 + 32)
    size = path.stat().st_size
    assert shape.memory_bytes(n_ctx=1024, n_seq_max=4) == \
        size + 1024 * 768 * 2 + 4 * 1000 * 4


def test_kv_heads_given_per_layer_are_summed(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_model(path, [2, 2, 1, 0])
    assert read_shape(path).kv_values_per_token == 5 * (64 + 32)


def test_a_file_that_is_not_gguf_is_a_model_source_error(tmp_path: Path) -> None:
    path = tmp_path / "not.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ModelSourceError, match="cannot read the GGUF header"):
        read_shape(path)


def test_a_q8_0_kv_cache_counts_34_bytes_per_32_values(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_model(path, 2)
    shape = read_shape(path)
    size = path.stat().st_size
    assert shape.memory_bytes(n_ctx=1024, n_seq_max=4, kv_cache_type="q8_0") == \
        size + 1024 * 768 * 34 // 32 + 4 * 1000 * 4
