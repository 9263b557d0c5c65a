"""Shared fixtures: the real default model, assembled once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelyard.models import resolve_model_source

DEFAULT_SOURCE = "pypi:qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir the tests' servers use; MODELYARD_TEST_DATA_DIR keeps it between runs."""
    kept = os.environ.get("MODELYARD_TEST_DATA_DIR")
    return Path(kept) if kept else tmp_path_factory.mktemp("modelyard-data")


@pytest.fixture(scope="session")
def default_model_path(data_dir: Path) -> Path:
    return resolve_model_source(DEFAULT_SOURCE, data_dir / "models", progress=False)
