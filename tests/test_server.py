"""Assembling a server from a Config (without the built-in engine: no model to load)."""

from __future__ import annotations

import os
from pathlib import Path

from modelyard.config import Config
from modelyard.server import build_app


def test_the_data_directory_and_database_are_private(tmp_path: Path) -> None:
    """Finding 10: they were created with the umask's modes (0755 / 0644 under umask 022),
    readable by every local user: the balances, the usage, the key digests."""
    data_dir = tmp_path / "modelyard"
    previous = os.umask(0o022)
    try:
        build_app(Config(data_dir=data_dir, local_model=False), progress=False)
    finally:
        os.umask(previous)
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert (data_dir / "modelyard.db").stat().st_mode & 0o777 == 0o600
