"""Priced requests under load, each with its own id in `user`, and what the client saw of
each: so that a test can match what succeeded with what the ledger billed."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import orjson

from tests.adversarial.harness import error_shape_problems


@dataclass
class Sent:
    """One request and what its client saw."""

    id: str
    url: str
    stream: bool
    started: float
    ended: float = 0.0
    status: int | None = None
    """None: the connection failed before a status arrived."""
    succeeded: bool = False
    """200 and the whole answer (a stream up to `[DONE]` without an error event)."""
    retry_after: str | None = None
    problems: list[str] = field(default_factory=list)
    """What is wrong with an error answer's shape."""
    message: str = ""
    """An error answer's message."""


async def send(client: httpx.AsyncClient, base_url: str, key: str, model: str,
               request_id: str, *, stream: bool) -> Sent:
    body = {"model": model, "user": request_id, "stream": stream,
            "messages": [{"role": "user", "content": f"request {request_id}"}]}
    sent = Sent(request_id, base_url, stream, time.monotonic())
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions",
                                 content=orjson.dumps(body),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"}) as response:
            sent.status = response.status_code
            sent.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                body = await response.aread()
                sent.problems = error_shape_problems(response.status_code, body)
                if not sent.problems:
                    sent.message = str(orjson.loads(body)["error"]["message"])
            elif stream:
                lines = [line async for line in response.aiter_lines() if line]
                sent.succeeded = bool(lines) and lines[-1] == "data: [DONE]" and not any(
                    line.startswith('data: {"error"') for line in lines)
            else:
                sent.succeeded = bool(orjson.loads(await response.aread()).get("choices"))
    except (httpx.HTTPError, orjson.JSONDecodeError):
        sent.succeeded = False
    sent.ended = time.monotonic()
    return sent


def client(connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=60, limits=httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections))


def staggered(http: httpx.AsyncClient, urls: Sequence[str], key: str, model: str,
              count: int, prefix: str, stagger_s: float = 0.0) -> list[asyncio.Task[Sent]]:
    """`count` requests, spread over `urls`, half of them streamed; request i starts
    i * `stagger_s` after the first (so that, mid-burst, some are starting, some running
    and some ending). Their tasks, started."""
    async def one(i: int) -> Sent:
        await asyncio.sleep(i * stagger_s)
        return await send(http, urls[i % len(urls)], key, model, f"{prefix}-{i}",
                          stream=i % 4 < 2)

    return [asyncio.create_task(one(i)) for i in range(count)]


async def burst(urls: Sequence[str], key: str, model: str, count: int, prefix: str,
                stagger_s: float = 0.0) -> list[Sent]:
    """`staggered` requests, awaited."""
    async with client(count) as http:
        return list(await asyncio.gather(*staggered(http, urls, key, model, count, prefix,
                                                    stagger_s)))


class Steady:
    """`workers` clients sending one request after another until stopped."""

    def __init__(self, url: str, key: str, model: str, workers: int, prefix: str) -> None:
        self.url, self.key, self.model = url, key, model
        self.workers = workers
        self.prefix = prefix
        self.sent: list[Sent] = []
        self._stop = asyncio.Event()
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._http = client(workers)

    async def _work(self) -> None:
        while not self._stop.is_set():
            number = next(self._ids)
            sent = await send(self._http, self.url, self.key, self.model,
                              f"{self.prefix}-{number}", stream=number % 2 == 0)
            self.sent.append(sent)
            if sent.status != 200:
                await asyncio.sleep(0.05)  # as a client backing off would

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> list[Sent]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._http.aclose()
        return self.sent
