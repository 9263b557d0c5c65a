"""Model sources: local paths, packaged models, the Hugging Face hub (never really reached)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.models import packaged, sources
from modelyard.models.sources import ModelSourceError, resolve_model_source

DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Refuse every connection and name lookup that would leave this machine; record them all."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def host_of(address: Any) -> str:
        return str(address[0]) if isinstance(address, tuple) else str(address)

    def connect(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and host_of(address) not in LOOPBACK:
            raise OSError(f"test guard: refused a connection to {address!r}")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        attempts.append(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and host_of(address) not in LOOPBACK:
            raise OSError(f"test guard: refused a connection to {address!r}")
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(("getaddrinfo", host))
        if host is not None and str(host) not in LOOPBACK:
            raise socket.gaierror(f"test guard: refused to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts


@pytest.fixture
def dead_hub(monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> list[Any]:
    """Point huggingface_hub at a local port nobody listens on, whenever it read HF_ENDPOINT."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_ENDPOINT", DEAD_ENDPOINT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub reads these at import time; _from_hub sets the first two with setdefault,
    # so give them values here that monkeypatch takes away again afterwards.
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "10")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    monkeypatch.setattr(constants, "ENDPOINT", DEAD_ENDPOINT)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        DEAD_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return no_network


# -- local paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.gguf", "MODEL.GGUF"])
def test_local_gguf_path(tmp_path: Path, name: str) -> None:
    model = tmp_path / name
    model.write_bytes(b"GGUF")
    assert resolve_model_source(str(model), tmp_path / "models") == model.resolve()


def test_local_path_is_resolved_to_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("weights/m.gguf", tmp_path / "models") == \
        tmp_path.resolve() / "weights" / "m.gguf"


def test_local_path_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_source("~/m.gguf", tmp_path / "models") == (tmp_path / "m.gguf").resolve()


def test_missing_local_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelSourceError, match="not found") as info:
        resolve_model_source(str(missing), tmp_path / "models")
    assert str(missing) in str(info.value)


def test_a_directory_is_not_a_model_file(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_model_source(str(tmp_path / "dir.gguf"), tmp_path / "models")


@pytest.mark.parametrize("name", ["model.bin", "model.gguf.part", "model", "qwen2.5-coder"])
def test_wrong_suffix(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match=r"not a \.gguf path") as info:
        resolve_model_source(str(tmp_path / name), tmp_path / "models")
    assert "pypi:NAME" in str(info.value)
    assert "hf:OWNER/REPO/FILE.gguf" in str(info.value)


# -- pypi: ---------------------------------------------------------------------------------


def test_unknown_packaged_model_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as info:
        resolve_model_source("pypi:no-such-model", tmp_path / "models")
    message = str(info.value)
    assert "'no-such-model'" in message
    assert "pypi:qwen2.5-coder-0.5b-instruct" in message


def test_packaged_model_with_a_missing_part_is_a_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = packaged.PackagedModel(name="fake", filename="fake.gguf",
                                  packages=("modelyard-no-such-part-1",), size=4,
                                  sha256="0" * 64)
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake", fake)
    monkeypatch.setitem(sources.PACKAGED_MODELS, "fake", fake)
    with pytest.raises(ModelSourceError, match="modelyard-no-such-part-1"):
        resolve_model_source("pypi:fake", tmp_path / "models", progress=False)


# -- hf: -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["hf:owner/repo", "hf:owner", "hf:", "hf:owner/repo/file.bin", "hf:owner/repo/"],
)
def test_malformed_hub_spec(tmp_path: Path, no_network: list[Any], spec: str) -> None:
    with pytest.raises(ModelSourceError, match=r"expected hf:OWNER/REPO/FILE\.gguf"):
        resolve_model_source(spec, tmp_path / "models")
    assert no_network == []


def test_hub_offline_fails_fast_with_a_source_error(tmp_path: Path, dead_hub: list[Any]) -> None:
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as info:
        resolve_model_source("hf:owner/repo/file.gguf", tmp_path / "models")
    elapsed = time.monotonic() - started

    assert elapsed < 15, f"took {elapsed:.1f} s to give up"
    assert "hf:owner/repo/file.gguf" in str(info.value)
    assert "local .gguf path" in str(info.value)
    # the request really went to the dead local endpoint, and nowhere else
    assert ("127.0.0.1", 9) in dead_hub
    hosts = {a[1] if a[0] == "getaddrinfo" else a[0] for a in dead_hub}
    assert hosts <= LOOPBACK


def test_hub_file_already_in_the_cache_needs_no_network(
    tmp_path: Path, dead_hub: list[Any]
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "models" / "hf" / "models--owner--repo"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "file.gguf").write_bytes(b"GGUF")

    path = resolve_model_source("hf:owner/repo/file.gguf", tmp_path / "models")

    assert path == snapshot / "file.gguf"
    assert dead_hub == []
