"""Preparing a request (rendering its prompt, tokenizing it, compiling its grammar) off the
event loop, a few at a time, within a time budget.

`prepare_chat` is CPU work that grows with the request: run on the event loop, one large or
intricate request would stall every other client, `/health` and the handling of SIGTERM.
Here it runs in a small pool of worker threads (`concurrency` of them); a request that waits
for a worker past the budget is a 503, one whose own preparation outlasts it a 422 naming
the cause. A thread cannot be stopped, so the work of a request refused that way still ends
in its worker, but it holds no more than that worker, and requests still waiting are dropped.

Small requests without tools or a response format (what nearly every request is) are
`cheap`: their preparation costs less than the hand-over to a thread, so they are prepared
on the event loop, before admission, and reserve their exact cost.

`prepare_chat` is a coroutine for the providers' sake, but must not wait on anything: in a
worker it runs to its end without an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

from modelyard.providers.base import ChatModel, ChatRequest, Prepared, ProviderError
from modelyard.providers.managed import until_loaded

T = TypeVar("T")

CHEAP_BODY_BYTES = 16 * 1024
"""Requests whose body is at most this large, without tools or a response format, are
prepared on the event loop (in well under a millisecond)."""

RETRY_AFTER_SECONDS = 1


def drive(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits on a future to its end, without an event loop."""
    while True:
        try:
            waited = coroutine.send(None)
        except StopIteration as done:
            value: T = done.value
            return value
        if waited is not None:  # a real wait: only an event loop could resume it
            coroutine.close()
            raise RuntimeError("prepare_chat waited on a future; it must not")


class Preparation:
    def __init__(self, concurrency: int = 4, timeout_s: float = 10.0) -> None:
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.concurrency, thread_name_prefix="modelyard-prepare")
        return self._pool

    async def prepare(self, provider: ChatModel, request: ChatRequest) -> Prepared:
        """`provider.prepare_chat(request)` in a worker thread, within the time budget
        (a pooled local model loaded first, on the loop: its own bound)."""
        await until_loaded(provider)
        future = self._executor().submit(lambda: drive(provider.prepare_chat(request)))
        waited = asyncio.wrap_future(future)
        waited.add_done_callback(_retrieve)  # also when nobody waits for it any more
        try:
            return await asyncio.wait_for(asyncio.shield(waited), self.timeout_s)
        except TimeoutError:
            if future.cancel():
                raise ProviderError(
                    503, "the server is busy preparing other requests; retry shortly",
                    code="server_overloaded", retry_after=RETRY_AFTER_SECONDS) from None
            raise ProviderError(
                422, f"preparing this request (rendering and tokenizing its prompt, compiling "
                f"its tools or response format) took longer than {self.timeout_s:g} s; make "
                "it smaller or its schema simpler", code="preparation_timeout") from None
        except asyncio.CancelledError:
            future.cancel()
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def cheap(request: ChatRequest, body_bytes: int) -> bool:
    """Whether preparing the request costs too little to be worth a thread or a bound."""
    return (body_bytes <= CHEAP_BODY_BYTES and not request.tools
            and request.response_format is None)
