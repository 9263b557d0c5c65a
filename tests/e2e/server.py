"""Start `modelyard serve` as a real process on a free port, and stop it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

STARTUP_TIMEOUT_SECONDS = 180.0
ADMIN_KEY_LINE = re.compile(r"admin key: (sk-my-\S+)")


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    admin_key: str = ""
    """The admin key the server printed when it created its (fresh) database."""

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the admin API with the admin key; the decoded JSON body (raises on errors)."""
        response = httpx.request(method, f"{self.base_url}/admin{path}", timeout=30,
                                 headers={"Authorization": f"Bearer {self.admin_key}"},
                                 **kwargs)
        response.raise_for_status()
        return response.json()

    def create_key(self, account: str, balance: str | None = None, **options: Any) -> str:
        """A new key on `account` (created first when `balance` is given)."""
        if balance is not None:
            self.admin("POST", "/accounts", json={"name": account, "balance": balance})
        created: dict[str, Any] = self.admin("POST", "/keys",
                                             json={"account": account, **options})
        return str(created["key"])

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def modelyard_command() -> list[str]:
    script = Path(sys.executable).with_name("modelyard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelyard.cli"]


@contextmanager
def running_server(data_dir: Path, config_toml: str, workdir: Path,
                   extra_args: tuple[str, ...] = ()) -> Iterator[RunningServer]:
    """`modelyard serve` on a free port. Unless the config names a `database_url`, the
    server gets a fresh SQLite database in `workdir` (so it prints a new admin key)."""
    with running_servers(data_dir, [(config_toml, workdir)], extra_args) as [server]:
        yield server


@contextmanager
def running_servers(data_dir: Path, configs: list[tuple[str, Path]],
                    extra_args: tuple[str, ...] = ()) -> Iterator[list[RunningServer]]:
    """Several `modelyard serve` processes (config TOML, workdir each), started together."""
    launched: list[RunningServer] = []
    try:
        for config_toml, workdir in configs:
            launched.append(_launch(data_dir, config_toml, workdir, extra_args))
        for server in launched:
            _wait_healthy(server)
        admin_keys = [found.group(1) for server in launched
                      if (found := ADMIN_KEY_LINE.search(server.log()))]
        admin_key = admin_keys[0] if admin_keys else ""
        yield [RunningServer(s.base_url, s.process, s.log_path, admin_key) for s in launched]
    finally:
        for server in launched:
            _stop(server.process)


def _launch(data_dir: Path, config_toml: str, workdir: Path,
            extra_args: tuple[str, ...]) -> RunningServer:
    port = free_port()
    config = workdir / "modelyard.toml"
    if "database_url" not in config_toml:
        config_toml = f'database_url = "sqlite:///{workdir / "platform.db"}"\n{config_toml}'
    config.write_text(config_toml)
    log_path = workdir / "server.log"
    env = dict(os.environ, MODELYARD_DATA_DIR=str(data_dir))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*modelyard_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
             "--config", str(config), *extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
    return RunningServer(f"http://127.0.0.1:{port}", process, log_path)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"modelyard serve exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"modelyard serve did not become healthy:\n{server.log()}")


def metric_value(metrics_text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    return 0.0
