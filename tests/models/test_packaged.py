"""Assembling a GGUF from part packages, with tiny fake parts."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from modelyard.models.packaged import (
    PACKAGED_MODELS,
    PackagedModel,
    PackagedModelError,
    assemble,
    part_path,
)

PARTS = {"zeta-part": b"first-", "alpha-part": b"\x00second\xff-", "mid-part": b"third"}
ORDER = ("zeta-part", "alpha-part", "mid-part")  # not alphabetical: order must come from here
CONTENT = b"".join(PARTS[name] for name in ORDER)


@pytest.fixture
def part_files(tmp_path: Path) -> dict[str, Path]:
    directory = tmp_path / "parts"
    directory.mkdir()
    files = {}
    for name, data in PARTS.items():
        files[name] = directory / f"{name}.bin"
        files[name].write_bytes(data)
    return files


def fake_model(*, sha256: str | None = None, size: int | None = None,
               packages: tuple[str, ...] = ORDER) -> PackagedModel:
    return PackagedModel(
        name="fake-model",
        filename="fake-model.gguf",
        packages=packages,
        size=len(CONTENT) if size is None else size,
        sha256=hashlib.sha256(CONTENT).hexdigest() if sha256 is None else sha256,
    )


class Finder:
    """A `find_part` that records what it was asked for."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.calls: list[str] = []

    def __call__(self, package: str) -> Path:
        self.calls.append(package)
        return self.files[package]


def never_called(package: str) -> Path:
    raise AssertionError(f"the parts were looked up again ({package})")


def test_assembly_concatenates_the_parts_in_package_order(
    tmp_path: Path, part_files: dict[str, Path]
) -> None:
    models_dir = tmp_path / "models" / "nested"   # created on demand
    finder = Finder(part_files)

    path = assemble(fake_model(), models_dir, progress=False, find_part=finder)

    assert path == models_dir / "fake-model.gguf"
    assert path.read_bytes() == CONTENT
    assert finder.calls == list(ORDER)
    marker = models_dir / "fake-model.gguf.sha256"
    assert marker.read_text().strip() == hashlib.sha256(CONTENT).hexdigest()
    assert sorted(p.name for p in models_dir.iterdir()) == ["fake-model.gguf",
                                                            "fake-model.gguf.sha256"]


def test_checksum_mismatch_raises_and_leaves_no_file(
    tmp_path: Path, part_files: dict[str, Path]
) -> None:
    models_dir = tmp_path / "models"
    model = fake_model(sha256="0" * 64)

    with pytest.raises(PackagedModelError, match="sha256") as info:
        assemble(model, models_dir, progress=False, find_part=Finder(part_files))

    assert hashlib.sha256(CONTENT).hexdigest() in str(info.value)
    assert "pip install --force-reinstall" in str(info.value)
    assert list(models_dir.iterdir()) == []   # no partial file, no target, no marker


def test_checksum_mismatch_keeps_an_existing_file_untouched(
    tmp_path: Path, part_files: dict[str, Path]
) -> None:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "fake-model.gguf").write_bytes(b"previous")

    with pytest.raises(PackagedModelError):
        assemble(fake_model(sha256="0" * 64), models_dir, progress=False,
                 find_part=Finder(part_files))

    assert (models_dir / "fake-model.gguf").read_bytes() == b"previous"
    assert sorted(p.name for p in models_dir.iterdir()) == ["fake-model.gguf"]


def test_wrong_total_size_is_refused_before_writing(
    tmp_path: Path, part_files: dict[str, Path]
) -> None:
    models_dir = tmp_path / "models"
    with pytest.raises(PackagedModelError, match=f"add up to {len(CONTENT)} bytes"):
        assemble(fake_model(size=len(CONTENT) + 1), models_dir, progress=False,
                 find_part=Finder(part_files))
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_second_call_reuses_the_verified_file(
    tmp_path: Path, part_files: dict[str, Path]
) -> None:
    models_dir = tmp_path / "models"
    first = assemble(fake_model(), models_dir, progress=False, find_part=Finder(part_files))
    mtime = first.stat().st_mtime_ns

    second = assemble(fake_model(), models_dir, progress=False, find_part=never_called)

    assert second == first
    assert second.read_bytes() == CONTENT
    assert second.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "damage",
    [
        lambda target, marker: marker.write_text("f" * 64 + "\n"),  # verified for another sha
        lambda target, marker: marker.unlink(),                     # never verified
        lambda target, marker: target.write_bytes(CONTENT[:-1]),    # truncated
    ],
    ids=["stale-marker", "no-marker", "truncated"],
)
def test_an_unverified_file_is_assembled_again(
    tmp_path: Path, part_files: dict[str, Path], damage: Callable[[Path, Path], object]
) -> None:
    models_dir = tmp_path / "models"
    target = assemble(fake_model(), models_dir, progress=False, find_part=Finder(part_files))
    marker = models_dir / "fake-model.gguf.sha256"
    damage(target, marker)

    finder = Finder(part_files)
    assert assemble(fake_model(), models_dir, progress=False, find_part=finder) == target
    assert finder.calls == list(ORDER)
    assert target.read_bytes() == CONTENT
    assert marker.read_text().strip() == fake_model().sha256


def test_missing_part_package_is_named() -> None:
    with pytest.raises(PackagedModelError) as info:
        part_path("modelyard-no-such-part-1")
    message = str(info.value)
    assert "'modelyard-no-such-part-1' is not installed" in message
    assert "pip install modelyard-no-such-part-1" in message


def test_assemble_with_a_missing_package_names_it(tmp_path: Path) -> None:
    model = fake_model(packages=("modelyard-no-such-part-1", "modelyard-no-such-part-2"))
    with pytest.raises(PackagedModelError, match="modelyard-no-such-part-1"):
        assemble(model, tmp_path / "models", progress=False)
    assert not (tmp_path / "models").exists()


def make_part_package(root: Path, module: str, files: list[str]) -> None:
    data = root / module / "data"
    data.mkdir(parents=True)
    (root / module / "__init__.py").write_text("")
    for name in files:
        (data / name).write_bytes(b"part")


def test_part_path_finds_the_data_file_of_an_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_part_package(tmp_path, "modelyard_fake_part_7", ["part07.bin"])
    monkeypatch.syspath_prepend(str(tmp_path))
    found = part_path("modelyard-fake-part-7")
    assert found == tmp_path / "modelyard_fake_part_7" / "data" / "part07.bin"


@pytest.mark.parametrize("files", [[], ["part01.bin", "part02.bin"]])
def test_part_path_wants_exactly_one_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: list[str]
) -> None:
    module = f"modelyard_fake_part_{len(files)}x"
    make_part_package(tmp_path, module, files)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PackagedModelError, match=r"no single model part file"):
        part_path(module.replace("_", "-"))


def test_installed_default_model_parts_add_up_to_its_size() -> None:
    # stat only: the 490 MB of parts are never read here
    model = PACKAGED_MODELS["qwen2.5-coder-0.5b-instruct"]
    parts = [part_path(package) for package in model.packages]
    assert [p.name for p in parts] == [f"part0{i}.bin" for i in range(1, 7)]
    assert sum(p.stat().st_size for p in parts) == model.size
    assert len(model.sha256) == 64


def test_part_path_finds_the_model_part_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "modelyard_fake_layout_2"
    module.mkdir()
    (module / "__init__.py").write_text("")
    (module / "model_part_0003").write_bytes(b"part")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert part_path("modelyard-fake-layout-2") == module / "model_part_0003"


def test_a_model_with_no_published_checksum_is_assembled_once(
    tmp_path: Path, part_files: dict[str, Path]
) -> None:
    model = PackagedModel(name="unsigned", filename="unsigned.gguf", packages=ORDER,
                          size=None, sha256=None)
    first = assemble(model, tmp_path / "models", progress=False, find_part=Finder(part_files))
    assert first.read_bytes() == CONTENT
    before = first.stat().st_mtime_ns
    again = assemble(model, tmp_path / "models", progress=False, find_part=Finder(part_files))
    assert again == first and again.stat().st_mtime_ns == before


def test_a_missing_part_of_an_optional_model_names_the_extra(tmp_path: Path) -> None:
    model = PackagedModel(name="optional", filename="optional.gguf",
                          packages=("modelyard-no-such-part-9",), size=None, sha256=None,
                          extra="r1")
    with pytest.raises(PackagedModelError, match=r"pip install 'modelyard\[r1\]'"):
        assemble(model, tmp_path / "models", progress=False)
