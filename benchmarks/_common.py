"""What the benchmark scripts share: the machine they ran on, and where results go.

The scripts run as `python benchmarks/NAME.py`, so this module is imported by its plain
name (`from _common import ...`); it needs nothing beyond the standard library, so a
benchmark may run in an environment of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(*packages: str) -> dict[str, Any]:
    """The CPU, core count, load average now, and the versions of `packages`."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],
            **{package.replace("-", "_"): version(package) for package in packages}}


def save_results(kind: str, payload: dict[str, Any],
                 args: argparse.Namespace | None = None) -> Path:
    """Write `payload` (and the run's settings) to results/KIND-TIMESTAMP.json; its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if args is not None:
        payload = {"settings": {k: str(v) if isinstance(v, Path) else v
                                for k, v in vars(args).items()}, **payload}
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"\nJSON: {out}", flush=True)
    return out
