"""How much memory a GGUF model takes once loaded, read from the file's header only.

A loaded model holds its weights (about the file's size), its KV cache (every context cell
holds a key and a value vector per layer, in the KV cache type: f16 or q8_0) and one row
of logits per sequence. The header's metadata gives the layer count, the KV heads and the
head sizes; nothing else of the file is read (the `gguf` package's reader decodes every
vocabulary entry, which takes seconds for a 150k-token vocabulary).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from modelyard.models.sources import ModelSourceError

KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32}
"""Bytes per key or value element by KV cache type (`[engine] kv_cache_type`): q8_0 stores
blocks of 32 one-byte values with one f16 scale."""
LOGIT_BYTES = 4

# GGUF value types (gguf's GGUFValueType): their sizes, strings (8) and arrays (9) aside.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
            11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its file size and attention shape."""

    file_bytes: int
    n_layer: int
    kv_values_per_token: int
    """Key plus value elements one context cell holds, summed over the layers."""
    n_vocab: int

    def memory_bytes(self, n_ctx: int, n_seq_max: int, kv_cache_type: str = "f16") -> int:
        """The file, the KV cache of `n_ctx` cells and `n_seq_max` rows of logits."""
        kv_bytes = n_ctx * self.kv_values_per_token * KV_BYTES_PER_VALUE[kv_cache_type]
        return (self.file_bytes + math.ceil(kv_bytes)
                + n_seq_max * self.n_vocab * LOGIT_BYTES)


class _Header:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack_from("<" + fmt, self.data, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = int(self.take("Q"))
        text = bytes(self.data[self.at:self.at + size]).decode("utf-8", "replace")
        self.at += size
        return text

    def value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = int(self.take("I")), int(self.take("Q"))
        if item in _SCALARS:  # numbers: kept (a per-layer head count), or skipped whole
            size = struct.calcsize(_SCALARS[item])
            values = struct.unpack_from(f"<{count}{_SCALARS[item]}", self.data, self.at) \
                if count <= 4096 else ()
            self.at += size * count
            return _Array(count, tuple(values))
        for _ in range(count):
            self.value(item)
        return _Array(count, ())


@dataclass(frozen=True)
class _Array:
    count: int
    values: tuple[int | float | bool, ...]


def read_shape(path: Path) -> ModelShape:
    """The model's shape from its GGUF header (a ModelSourceError if it is not GGUF)."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) \
                as data:
            return _shape(_Header(data), path.stat().st_size)
    except (OSError, ValueError, struct.error, KeyError) as exc:
        raise ModelSourceError(f"cannot read the GGUF header of {path}: {exc}") from exc


def _shape(header: _Header, file_bytes: int) -> ModelShape:
    if header.data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    header.at = 4
    header.take("I")  # version
    header.take("Q")  # tensor count
    fields: dict[str, object] = {}
    for _ in range(int(header.take("Q"))):
        key = header.string()
        kind = int(header.take("I"))
        if key == "tokenizer.ggml.tokens" and kind == _ARRAY and _enough(fields):
            header.take("I")  # the strings' type; their count is the vocabulary's size
            fields[key] = _Array(int(header.take("Q")), ())
            break  # what follows (the strings, merges, the template) is not needed
        fields[key] = header.value(kind)
    arch = str(fields["general.architecture"])
    n_layer = int(_number(fields[f"{arch}.block_count"]))
    n_embd = int(_number(fields[f"{arch}.embedding_length"]))
    n_head = _per_layer(fields[f"{arch}.attention.head_count"], n_layer)
    n_head_kv = _per_layer(fields.get(f"{arch}.attention.head_count_kv",
                                      fields[f"{arch}.attention.head_count"]), n_layer)
    head = n_embd // max(n_head[0], 1)
    key_length = int(_number(fields.get(f"{arch}.attention.key_length", head)))
    value_length = int(_number(fields.get(f"{arch}.attention.value_length", head)))
    tokens = fields.get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if isinstance(tokens, _Array) else 0
    kv = sum(heads * (key_length + value_length) for heads in n_head_kv)
    return ModelShape(file_bytes, n_layer, kv, n_vocab)


def _enough(fields: dict[str, object]) -> bool:
    arch = fields.get("general.architecture")
    return isinstance(arch, str) and f"{arch}.block_count" in fields


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _per_layer(value: object, n_layer: int) -> list[int]:
    """A head count: one number for every layer, or one per layer."""
    if isinstance(value, _Array):
        return [int(v) for v in value.values] or [0] * n_layer
    return [int(_number(value))] * n_layer
