"""An upstream deployment: one OpenAI-compatible server (vLLM, SGLang, llama-server,
Ollama, a hosted provider), reached through its own keep-alive pool (`http1.Pool`).

The upstream is always asked to stream, with usage. `open` sends the request and waits
for the first event, so every failure up to there (connection errors, timeouts, 429, 5xx,
malformed JSON) is an `UpstreamError` that the router may retry on another deployment.
What follows is an `UpstreamStream` of `ChatDelta`s, one upstream event at a time;
failures there are `StreamError`s, never retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from modelyard.config import DeploymentConfig
from modelyard.providers.base import StreamError
from modelyard.providers.http1 import HTTPError, Pool
from modelyard.providers.upstream_stream import UpstreamStream


class UpstreamError(Exception):
    """A failure before the first event: `retriable` ones may go to another deployment."""

    def __init__(self, status: int, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retriable = retriable


class UpstreamDeployment:
    """One `[[models.deployments]]` entry of kind "openai"."""

    def __init__(self, config: DeploymentConfig, api_key: str | None) -> None:
        self.config = config
        self.name = config.name or f"{config.base_url}#{config.upstream_model or ''}"
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._pool = Pool(config.base_url, connect_timeout=config.connect_timeout,
                          max_idle=config.max_concurrency, headers=headers)
        self.active = 0

    @property
    def full(self) -> bool:
        return self.active >= self.config.max_concurrency

    async def open(self, body: dict[str, Any], prompt_estimate: int,
                   on_end: Callable[[bool], None]) -> UpstreamStream:
        """Send the request and read up to its first event (a stream) or its whole answer
        (a JSON body, when `body["stream"]` is false). `on_end(failed)` is called once
        when the stream ends, whatever the way."""
        config = self.config
        deadline = time.monotonic() + config.total_timeout
        streaming = bool(body.get("stream"))
        # A streamed answer must start within the first-token timeout, and no silence in
        # it may last longer; a whole one must come within the total timeout.
        limit = config.first_token_timeout if streaming else config.total_timeout
        try:
            async with asyncio.timeout(limit):
                response = await self._pool.post("chat/completions", orjson.dumps(body),
                                                 read_timeout=limit)
                try:
                    if response.status != 200:
                        raw = await response.read()
                        response.release()
                        raise _status_error(response.status, raw)
                    stream = UpstreamStream(response, prompt_estimate, deadline, on_end)
                    if streaming and "json" not in response.content_type:
                        await stream.peek()
                    else:
                        stream.read_whole(await response.read())
                except BaseException:
                    response.close()
                    raise
        except TimeoutError:
            what = "no first token" if streaming else "no answer"
            raise UpstreamError(504, f"upstream {self.name}: {what} within {limit} s",
                                retriable=True) from None
        except HTTPError as exc:
            raise UpstreamError(502, f"upstream {self.name}: {exc}", retriable=True) from None
        except StreamError as exc:
            raise UpstreamError(502, f"upstream {self.name}: {exc}", retriable=True) from None
        return stream

    async def close(self) -> None:
        self._pool.close()


def _status_error(status: int, raw: bytes) -> UpstreamError:
    message = raw[:500].decode("utf-8", "replace")
    try:
        error = orjson.loads(raw).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        elif isinstance(error, str):
            message = error
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return UpstreamError(status, f"upstream answered {status}: {message}",
                         retriable=status == 429 or status >= 500)
