"""Embeddings benchmark: modelyard's /v1/embeddings next to llama.cpp's own server.

Both serve the same GGUF (all-MiniLM-L6-v2, converted by modelyard from its PyPI
package) on loopback, side by side in one run: `modelyard serve` (its default config: the
chat engine loaded and idle, the platform on with SQLite, a key and a price, so every
request is checked in, admitted, settled and recorded) and `llama-server --embedding`
(no key) with as many slots as the highest concurrency and the same batch size. For each
concurrency (default 1, 8 and 32 clients, each sending its next request as soon as its
last was answered) and each server in turn, repeated `--rounds` times and interleaved so
that both see the same machine: requests/s, and the median and 99th percentile latency of
a request whose input is one text of exactly `--tokens` tokens ([CLS] and [SEP]
included). The table shows the medians over rounds.

    .venv/bin/python benchmarks/bench_embeddings.py --llama-server /path/to/llama-server

The llama-server binary is not part of modelyard: build it from the llama.cpp sources
of the llama-cpp-python release modelyard pins, with the server enabled, and pass its
path (or set LLAMA_SERVER). The load generator shares the machine with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import Pool, exit_on_sigterm, machine, save_results, stop_processes  # noqa: E402

from tests.e2e.server import free_port, modelyard_command  # noqa: E402

MODEL = "all-minilm-l6-v2"
WORDS = ("time", "people", "water", "house", "world", "music", "river", "light", "paper",
         "green", "city", "night", "story", "money", "road", "school", "table", "market")


def text_of(tokens: int, model_path: Path) -> str:
    """A text of exactly `tokens` tokens in the model's tokenizer (specials included)."""
    from modelyard.engine.embedding_model import EmbeddingModelConfig, LlamaEmbeddingModel

    model = LlamaEmbeddingModel(EmbeddingModelConfig(model_path, batch_tokens=512))
    try:
        words: list[str] = []
        while len(model.tokenize(" ".join(words))) < tokens:
            words.append(WORDS[len(words) % len(WORDS)])
        text = " ".join(words)
        assert len(model.tokenize(text)) == tokens, "pick words of one token each"
        return text
    finally:
        model.close()


class Target:
    def __init__(self, name: str, port: int, key: str | None,
                 process: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.port = port
        self.key = key
        self.process = process

    def request(self, text: str) -> bytes:
        body = orjson.dumps({"model": MODEL, "input": text})
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        return (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
                ).encode() + body


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become healthy")


def start_modelyard(workdir: Path, data_dir: Path, threads: int,
                    batch: int) -> tuple[Target, str]:
    port = free_port()
    config = workdir / "modelyard.toml"
    config.write_text(f'database_url = "sqlite:///{workdir / "platform.db"}"\n'
                      f"[embedding]\ninput_price = 0.01\nthreads = {threads}\n"
                      f"batch_size = {batch}\n")
    log = workdir / "modelyard.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*modelyard_command(), "serve", "--port", str(port), "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, MODELYARD_DATA_DIR=str(data_dir)))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, log)
    admin = next(line.split("admin key: ")[1].strip() for line in log.read_text().splitlines()
                 if "admin key: " in line)
    headers = {"Authorization": f"Bearer {admin}"}
    httpx.post(f"{url}/admin/accounts", headers=headers, timeout=10,
               json={"name": "bench", "balance": "1000"}).raise_for_status()
    created = httpx.post(f"{url}/admin/keys", headers=headers, timeout=10,
                         json={"account": "bench"})
    created.raise_for_status()
    return Target("modelyard", port, created.json()["key"], process), url


def start_llama_server(binary: Path, model: Path, workdir: Path, threads: int, batch: int,
                       slots: int) -> Target:
    port = free_port()
    log = workdir / "llama-server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(binary), "-m", str(model), "--embedding", "--host", "127.0.0.1",
             "--port", str(port), "-t", str(threads), "-tb", str(threads),
             "-b", str(batch), "-ub", str(batch), "-np", str(slots),
             "-c", str(512 * slots), "--alias", MODEL],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", process, log)
    return Target("llama-server", port, None, process)


async def closed_loop(target: Target, payload: bytes, clients: int,
                      seconds: float) -> tuple[float, float, float, int]:
    """`clients` loops, each sending its next request once its last was answered:
    requests/s, the median and 99th percentile latency (ms) and the failures."""
    pool = Pool(target.port)
    latencies: list[float] = []
    failures = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal failures
        while time.perf_counter() < stop:
            elapsed = await pool.request(payload)
            if elapsed is None:
                failures += 1
            else:
                latencies.append(elapsed)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    pool.close()
    if not latencies:
        return 0.0, float("nan"), float("nan"), failures
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return len(latencies) / wall, statistics.median(latencies) * 1000, p99 * 1000, failures


def check_answer(target: Target, text: str) -> list[float]:
    headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
    answer = httpx.post(f"http://127.0.0.1:{target.port}/v1/embeddings", headers=headers,
                        json={"model": MODEL, "input": text}, timeout=30)
    answer.raise_for_status()
    vector: list[float] = answer.json()["data"][0]["embedding"]
    return vector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", type=Path,
                        default=os.environ.get("LLAMA_SERVER") or None)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    exit_on_sigterm()   # so the servers are still stopped (the `finally` below)
    if args.llama_server is None:
        raise SystemExit("pass --llama-server PATH (or set LLAMA_SERVER)")
    from modelyard.config import load_config
    from modelyard.models.embedding_sources import resolve_embedding_source

    args.data_dir = args.data_dir or load_config().data_dir
    model = resolve_embedding_source(f"pypi:{MODEL}", args.data_dir / "models")
    levels = [int(c) for c in args.concurrency.split(",")]
    text = text_of(args.tokens, model)
    info: dict[str, Any] = machine("llama-cpp-python", "uvicorn")
    print(f"{info['cpu']}, {info['cores']} cores, load average "
          f"{info['load_average_at_start']:.1f}; {MODEL} ({model.name}), one input of "
          f"{args.tokens} tokens per request, {args.threads} threads, batch {args.batch}, "
          f"{args.seconds:g} s per measurement, median of {args.rounds} rounds", flush=True)
    results: dict[str, dict[int, list[tuple[float, float, float, int]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        targets: list[Target] = []
        try:
            modelyard, _ = start_modelyard(workdir, args.data_dir, args.threads, args.batch)
            targets.append(modelyard)
            targets.append(start_llama_server(args.llama_server, model, workdir,
                                              args.threads, args.batch, max(levels)))
            ours, theirs = (check_answer(t, text) for t in targets)
            similarity = sum(a * b for a, b in zip(ours, theirs, strict=True))
            print(f"cosine of the two servers' vectors for the input: {similarity:.6f}")
            for clients in levels:
                for _ in range(args.rounds):
                    for target in targets:
                        payload = target.request(text)
                        asyncio.run(closed_loop(target, payload, clients, 1.0))  # warm
                        measured = asyncio.run(closed_loop(target, payload, clients,
                                                           args.seconds))
                        results.setdefault(target.name, {}).setdefault(clients, []).append(
                            measured)
                        print(f"  {target.name} x{clients}: {measured[0]:.1f} req/s, "
                              f"p50 {measured[1]:.1f} ms, p99 {measured[2]:.1f} ms, "
                              f"{measured[3]} failed", flush=True)
        finally:
            stop_processes(target.process for target in targets)
    print("\n| concurrency | modelyard req/s | p50 / p99 | llama-server req/s | p50 / p99 |")
    print("|---:|---:|---:|---:|---:|")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for clients in levels:
        cells = []
        for name in ("modelyard", "llama-server"):
            runs = results[name][clients]
            rate = statistics.median(r[0] for r in runs)
            p50 = statistics.median(r[1] for r in runs)
            p99 = statistics.median(r[2] for r in runs)
            failed = sum(r[3] for r in runs)
            cells += [f"{rate:.1f}" + (f" ({failed} failed)" if failed else ""),
                      f"{p50:.0f} / {p99:.0f} ms"]
            summary.setdefault(name, {})[str(clients)] = {
                "requests_per_second": rate, "p50_ms": p50, "p99_ms": p99, "failed": failed}
        print(f"| {clients} | {' | '.join(cells)} |")
    save_results("embeddings", {"machine": info, "cosine_between_servers": similarity,
                                "results": summary}, args)


if __name__ == "__main__":
    main()
