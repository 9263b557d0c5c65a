"""Convert a sentence-transformers BERT checkpoint (safetensors) into a GGUF for llama.cpp.

What llama.cpp's BERT graph reads, written with the `gguf` package's `GGUFWriter`: the
hyperparameters from `config.json`, non-causal attention, the pooling the
sentence-transformers `Pooling` module names (mean, CLS or last token), the WordPiece
vocabulary of `vocab.txt` in llama.cpp's "phantom space" form (a word-initial piece gets a
leading U+2581, a `##` continuation loses its `##`; special tokens stay as they are), its
special tokens and the normalizer's lowercasing. Matrices are stored as F16; vectors
(norms, biases), the position and token-type embeddings stay F32, as llama.cpp's own
converter stores them.

The safetensors file is read with numpy alone (an 8-byte header length, a JSON header,
then the raw tensors), so converting needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.errors import ModelyardError

ARCH = "bert"
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
_DROPPED = ("embeddings.position_ids", "pooler.")
"""Checkpoint tensors the embedding graph does not use."""
_F32_NAMES = ("position_embd.weight", "token_types.weight")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ConversionError(ModelyardError, RuntimeError):
    """The checkpoint is not a BERT model this converter can write."""


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    """In llama.cpp's phantom-space form."""
    types: list[int]
    """gguf TokenType per token: NORMAL (1) or CONTROL (3)."""
    special: dict[str, int]
    """bos, eos, sep, unk, pad, mask (and cls, the same as bos) -> token id."""
    lowercase: bool
    strip_accents: bool


def read_safetensors(path: Path) -> Iterator[tuple[str, npt.NDArray[Any]]]:
    """Every tensor of a safetensors file, by name, as a numpy array (a view of the file)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if len(data) < 8:
        raise ConversionError(f"{path} is not a safetensors file")
    (header_size,) = struct.unpack("<Q", bytes(data[:8]))
    if header_size > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ConversionError(f"{path} has a header of {header_size} bytes")
    header = json.loads(bytes(data[8:8 + header_size]))
    start = 8 + header_size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConversionError(f"{name} has dtype {entry['dtype']}; F32 or F16 expected")
        begin, end = entry["data_offsets"]
        shape = tuple(int(n) for n in entry["shape"])
        raw = data[start + begin:start + end]
        if len(raw) != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise ConversionError(f"{name}: {len(raw)} bytes do not hold shape {shape}")
        yield name, raw.view(dtype).reshape(shape)


def read_vocabulary(directory: Path, vocab_size: int) -> Vocabulary:
    """`vocab.txt` (one token a line, by id) with the special tokens of `tokenizer.json`."""
    pieces = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if pieces and pieces[-1] == "":
        pieces.pop()
    if len(pieces) != vocab_size:
        raise ConversionError(f"vocab.txt has {len(pieces)} tokens, config.json says "
                              f"{vocab_size}")
    tokenizer = _json(directory / "tokenizer.json")
    control = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens = [piece if i in control else piece[2:] if piece.startswith("##")
              else "\u2581" + piece for i, piece in enumerate(pieces)]
    types = [3 if i in control else 1 for i in range(len(pieces))]
    index = {piece: i for i, piece in enumerate(pieces)}
    names = {"cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]", "pad": "[PAD]", "mask": "[MASK]"}
    special = {kind: index[text] for kind, text in names.items() if text in index}
    if "cls" not in special or "sep" not in special:
        raise ConversionError("the vocabulary has no [CLS] or [SEP] token")
    # llama.cpp's WordPiece tokenizer starts an input with bos and ends it with sep.
    special["bos"], special["eos"] = special["cls"], special["sep"]
    normalizer = tokenizer.get("normalizer") or {}
    lowercase = bool(normalizer.get("lowercase", True))
    strip_accents = normalizer.get("strip_accents")
    return Vocabulary(tokens, types, special, lowercase,
                      lowercase if strip_accents is None else bool(strip_accents))


def pooling_type(directory: Path) -> int:
    """gguf PoolingType of the sentence-transformers Pooling module: MEAN 1, CLS 2, LAST 3."""
    config = _json(directory / "1_Pooling" / "config.json")
    if config.get("pooling_mode_mean_tokens") or config.get("pooling_mode") == "mean":
        return 1
    if config.get("pooling_mode_cls_token") or config.get("pooling_mode") == "cls":
        return 2
    if config.get("pooling_mode_lasttoken") or config.get("pooling_mode") == "lasttoken":
        return 3
    raise ConversionError(f"unsupported pooling in {directory / '1_Pooling'}: {config}")


def convert_bert(directory: Path, target: Path) -> None:
    """Write the GGUF of the checkpoint in `directory` to `target` (overwritten)."""
    import gguf  # imported here: only a first start converts

    config = _json(directory / "config.json")
    if config.get("model_type") != "bert":
        raise ConversionError(f"{directory} holds a {config.get('model_type')!r} model, "
                              "not bert")
    blocks = int(config["num_hidden_layers"])
    vocab = read_vocabulary(directory, int(config["vocab_size"]))
    writer = gguf.GGUFWriter(str(target), ARCH)
    writer.add_name(directory.name)
    writer.add_block_count(blocks)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(pooling_type(directory)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_bos_token_id(vocab.special["bos"])
    writer.add_eos_token_id(vocab.special["eos"])
    writer.add_sep_token_id(vocab.special["sep"])
    for kind in ("unk", "pad", "mask"):
        if kind in vocab.special:
            getattr(writer, f"add_{kind}_token_id")(vocab.special[kind])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(True)
    # llama.cpp reads these keys (their defaults are true); the gguf package has no helper.
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", vocab.lowercase)
    writer.add_bool("tokenizer.ggml.normalizer.strip_accents", vocab.strip_accents)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, blocks)
    for name, tensor in read_safetensors(directory / "model.safetensors"):
        name = name.removeprefix("bert.")
        if name.startswith(_DROPPED):
            continue
        if not np.issubdtype(tensor.dtype, np.floating):
            raise ConversionError(f"{name} has dtype {tensor.dtype}; F32 or F16 expected")
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConversionError(f"no GGUF name for the tensor {name}")
        keep_f32 = tensor.ndim <= 1 or mapped.endswith("_norm.weight") or mapped in _F32_NAMES
        writer.add_tensor(mapped, np.ascontiguousarray(
            tensor, dtype=np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return value
