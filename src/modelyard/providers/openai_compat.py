"""An upstream deployment: one OpenAI-compatible server (vLLM, SGLang, llama-server,
Ollama, a hosted provider), reached through its own keep-alive pool (`http1.Pool`).

The upstream is asked the way the client asked (a stream with usage, or one JSON answer).
`open` sends the request and reads up to the first event (or the whole answer), so every
failure up to there is an `UpstreamError`, which says whether the router may send the
request to another deployment (`retriable`): only when this one cannot have produced an
answer to bill (no connection, an error status, a timeout before any output, after which
the connection is closed). An answer that came but cannot be read (malformed JSON, wrong
types, over its size cap) was generated: it is not sent elsewhere. What follows is an
`UpstreamStream` of `ChatDelta`s; failures there are `StreamError`s, never retried.

Nothing of the upstream's own reaches a client but the short message of a 400 or 422 (the
client's own parameter refused), sanitized (`public_message`): no URL, address, key or
raw body. Everything else is logged with the request id and answered opaquely.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from modelyard.config import DeploymentConfig
from modelyard.errors import ModelyardError
from modelyard.providers.base import ChatRequest
from modelyard.providers.http1 import HTTPError, Pool, Response, ResponseTooLarge
from modelyard.providers.profiles import build_body
from modelyard.providers.upstream_stream import Malformed, ReportedError, UpstreamStream
from modelyard.sampling import Sampling

MAX_ERROR_BODY_BYTES = 64 * 1024
"""How much of an error answer's body is read (for its message, which is logged)."""

REFUSED_STATUSES = frozenset({400, 413, 422})
"""Statuses that refuse the client's own request: passed on (400, or 422 as it came)
with the upstream's message sanitized, and not retried elsewhere."""


class UpstreamError(ModelyardError):
    """A failure before the first event. `message` is the detail, for the log only.
    `retriable`: another deployment may be tried. `public`: what the client may read, for
    a refusal of its own request (None: an opaque message naming the request).
    `transient`: a failure that may pass (503 with Retry-After once all tries failed),
    not one of configuration (a 401 or 403: our key is wrong; then 502)."""

    def __init__(self, status: int, message: str, *, retriable: bool,
                 public: str | None = None, param: str | None = None,
                 code: str | None = None, transient: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, param=param, code=code)
        self.retriable = retriable
        self.public = public
        self.transient = transient
        self.retry_after = retry_after
        """The upstream's own Retry-After (seconds), when it sent one."""


@dataclass(frozen=True)
class UpstreamCall:
    """What one deployment is sent for one request: the path under its base URL, the JSON
    body, and whether the answer streams."""

    path: str
    body: dict[str, Any]
    stream: bool
    relay_as: str | None = None
    """A request in the deployment's own API whose answer is relayed as it came, under
    this model name (`AnthropicRelay`); None: read into deltas."""


StreamFactory = Callable[[Response], UpstreamStream]
"""Reads one response of a deployment's API (OpenAI's, Anthropic's, Gemini's)."""


class UpstreamDeployment:
    """One `[[models.deployments]]` entry of kind "openai"; the native kinds
    (`anthropic_upstream`, `gemini_upstream`) share its pool, timeouts and errors."""

    def __init__(self, config: DeploymentConfig, api_key: str | None) -> None:
        self.config = config
        self.name = config.name or f"{config.base_url}#{config.upstream_model or ''}"
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        headers.update(self.key_headers(api_key))
        self._pool = Pool(config.base_url, connect_timeout=config.connect_timeout,
                          max_idle=config.max_concurrency, headers=headers)
        self.active = 0

    def key_headers(self, api_key: str | None) -> dict[str, str]:
        """The headers that carry the deployment's key (and its API's version)."""
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @property
    def full(self) -> bool:
        return self.active >= self.config.max_concurrency

    def build(self, request: ChatRequest, model: str, max_tokens: int, defaults: Sampling,
              drop_unsupported: bool) -> UpstreamCall:
        """The request in this deployment's API; ProviderError (422) for a parameter it
        cannot take."""
        body = build_body(self.config.profile, request, model, max_tokens, defaults,
                          drop_unsupported)
        path = "chat/completions" if "messages" in body else "completions"
        return UpstreamCall(path, body, request.stream)

    async def send(self, call: UpstreamCall, prompt_estimate: int,
                   on_end: Callable[[bool], None], request_id: str = "") -> UpstreamStream:
        """`open` for a call `build` made."""
        return await self.open(call.body, prompt_estimate, on_end, request_id, call.path)

    async def open(self, body: dict[str, Any], prompt_estimate: int,
                   on_end: Callable[[bool], None], request_id: str = "",
                   path: str = "chat/completions") -> UpstreamStream:
        """Send the request and read up to its first event (a stream) or its whole answer
        (a JSON body, when `body["stream"]` is false). `on_end(failed)` is called once
        when the stream ends, whatever the way."""
        def reader(response: Response) -> UpstreamStream:
            return UpstreamStream(response, prompt_estimate, on_end, request_id=request_id,
                                  deployment=self.name, choices=_choices(body))
        return await self.exchange(path, orjson.dumps(body), bool(body.get("stream")),
                                   reader)

    async def exchange(self, path: str, payload: bytes, streaming: bool,
                       reader: StreamFactory) -> UpstreamStream:
        """POST `payload` to `path`, and read the answer with `reader`'s stream up to its
        first delta (streaming) or whole; every failure up to there an UpstreamError."""
        config = self.config
        deadline = time.monotonic() + config.total_timeout
        # A streamed answer must start within the first-token timeout, and no silence in
        # it may last longer; a whole one must come within the total timeout.
        limit = config.first_token_timeout if streaming else config.total_timeout
        try:
            async with asyncio.timeout(limit):
                response = await self._pool.post(path, payload,
                                                 read_timeout=limit, deadline=deadline)
                try:
                    if response.status != 200:
                        raw = await _error_body(response)
                        response.release()
                        raise _status_error(response.status, raw,
                                            _retry_after(response.headers))
                    stream = reader(response)
                    if streaming and "json" not in response.content_type:
                        await stream.peek()
                    else:
                        stream.read_whole(await response.read())
                except BaseException:
                    response.close()
                    raise
        except TimeoutError:
            what = "no first token" if streaming else "no answer"
            raise UpstreamError(504, f"{what} within {limit} s", retriable=True) from None
        except ResponseTooLarge as exc:
            raise UpstreamError(502, str(exc), retriable=False) from None
        except HTTPError as exc:
            raise UpstreamError(502, str(exc), retriable=True) from None
        except ReportedError as exc:
            raise UpstreamError(502, f"the upstream reported an error: {exc!r}",
                                retriable=True) from None
        except Malformed as exc:
            raise UpstreamError(502, f"a malformed answer: {exc}", retriable=False) from None
        return stream

    async def close(self) -> None:
        self._pool.close()


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    return n if isinstance(n, int) and n > 0 else 1


async def _error_body(response: Response) -> bytes:
    try:
        return await response.read(MAX_ERROR_BODY_BYTES)
    except HTTPError:
        return b""


MAX_RETRY_AFTER_S = 60.0
"""An upstream's Retry-After longer than this is read as this."""


def _retry_after(headers: dict[str, str]) -> float | None:
    """Retry-After in seconds (its delay form; a date is not honoured)."""
    try:
        value = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return min(value, MAX_RETRY_AFTER_S) if value >= 0 else None


def _status_error(status: int, raw: bytes, retry_after: float | None = None) -> UpstreamError:
    detail = f"status {status}: {raw[:500]!r}"
    if status not in REFUSED_STATUSES:
        # 429, 529 (Anthropic's overloaded) and 5xx pass; any other status (401, 403: our
        # key; 404: our URL or model name) is the deployment's configuration. Either way
        # the request did not run.
        return UpstreamError(502, detail, retriable=True,
                             transient=status == 408 or status == 429 or status >= 500,
                             retry_after=retry_after)
    message, param = _error_fields(raw)
    public = "the upstream rejected the request"
    if message:
        public += f": {message}"
    return UpstreamError(422 if status == 422 else 400, detail, retriable=False,
                         public=public, param=param, code="upstream_refused")


def _error_fields(raw: bytes) -> tuple[str, str | None]:
    """The sanitized message and param of an OpenAI-shaped error body ("" and None when
    it has none: a raw body is never passed on)."""
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return "", None
    if isinstance(error, str):
        return public_message(error), None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return "", None
    param = error.get("param")
    return public_message(error["message"]), (
        param if isinstance(param, str) and _PARAM.fullmatch(param) else None)


_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]]{0,63}")
_SECRETS = [
    (re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*"), "<url>"),
    (re.compile(r"\[[0-9a-fA-F:.]*:[0-9a-fA-F:.]*\](?::\d+)?"), "<address>"),
    (re.compile(r"(?<![\w:])[0-9a-fA-F]*::[0-9a-fA-F:.]*|\b(?:[0-9a-fA-F]{1,4}:){3,7}"
                r"[0-9a-fA-F]{1,4}\b"), "<address>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\b[\w-]+(?:\.[\w-]+)+:\d{1,5}\b"), "<address>"),
    (re.compile(r"(?i)\bbearer\s+[^\s,;]+"), "<credential>"),
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_*-]{8,}|\bhf_[A-Za-z0-9]{8,}"), "<credential>"),
]
PUBLIC_MESSAGE_CHARS = 200


def public_message(message: str) -> str:
    """An upstream's error message as a client may read it: URLs, addresses and
    credential-like words replaced, control characters and runs of blanks folded, at most
    `PUBLIC_MESSAGE_CHARS` characters."""
    text = message[:4 * PUBLIC_MESSAGE_CHARS]
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > PUBLIC_MESSAGE_CHARS:
        text = text[:PUBLIC_MESSAGE_CHARS - 3].rstrip() + "..."
    return text
