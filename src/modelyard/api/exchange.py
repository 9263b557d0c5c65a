"""The path every billed request takes, whatever its endpoint: from the key's check-in to
the bill.

The order keeps every cost behind the limit that pays for it: the key's request rate and
requests in flight are checked before its body is read (`check_in`); the body is read
within a size cap and a deadline. The endpoint (`Endpoint`: chat completions, text
completions, embeddings) then parses it, finds its model (`Run.model`), works out upper
bounds of its prompt and completion and asks for them to be admitted (`Run.admit`: the
token rate and balance charged for the bounds); only then does it do the expensive work
and answer, reporting the usage it delivered (`Bill.sent`) and the stream it started
(`Run.stream`).

From admission on, one try/finally owns the bill: whatever ends the request (its answer,
a refusal, an error in the model or in modelyard, the client going away, the server
shutting down) settles it exactly once with the status it really ended with, and the ticket
is checked out exactly once after that. A watcher task cancels the work when the client goes
away (stream or not), so an abandoned request stops generating and pays for the tokens
generated until then. Settlement runs as a background task, so a cancelled request cannot
skip it; a complete answer waits for it before its last bytes (`Bill.settle_now`), so that a
gateway killed just after cannot leave an answer its client saw complete unbilled.

To add an endpoint: write `async def answer(run: Run, body: bytes) -> None`, route its
path to `handle(state, scope, receive, send, answer)` (see api/lane.py), and call
`run.model`, `run.admit`, then `run.bill.sent(...)`, `run.bill.status = 200` and
`await run.bill.settle_now()` before the answer's last bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from modelyard.api.errors import OPENAI, APIError, ErrorStyle, as_api_error
from modelyard.api.reply import Reply, read_body
from modelyard.api.shutdown import SHUTTING_DOWN
from modelyard.api.state import AppState
from modelyard.platform.gate import Admission, Caller, Outcome, Ticket
from modelyard.providers.base import ChatModel, ChatStream
from modelyard.usage import Usage

logger = logging.getLogger(__name__)

SETTLE_WAIT_S = 2.0
"""How long a complete answer waits for its settlement before its last bytes go out."""

CLIENT_CLOSED = 499
"""The status recorded for a request whose client went away before its answer was sent
(nginx's "client closed request"); a stream that was cut records the 200 it was sent."""


@dataclass
class Bill:
    """What a request has used so far and how it ended, for its settlement."""

    state: AppState
    admission: Admission
    user: str | None
    started: float
    first_token_at: float | None = None
    used: Usage | None = None
    status: int = 500
    """How the request ended: until something better is known, a failure of modelyard's."""
    client_disconnected: bool = False
    settled: bool = False

    def sent(self, usage: Usage) -> None:
        """The request's usage so far (its totals), once what it counts reached the client."""
        if self.first_token_at is None and usage.completion_tokens:
            self.first_token_at = time.monotonic()
        last = self.used
        if last is not None and last.cached_tokens > usage.cached_tokens:
            usage = Usage(usage.prompt_tokens, last.cached_tokens, usage.completion_tokens,
                          usage.reasoning_tokens, usage.estimated)
        self.used = usage

    async def settle_now(self) -> None:
        """Settle before the answer's last bytes go out, so that no answer a client saw
        complete is lost with a gateway that dies just after it (the settlement goes on if
        the request is cancelled meanwhile), waiting at most SETTLE_WAIT_S."""
        task = self.settle()
        if task is not None:
            # A database that does not answer must not hold the answer: past the wait the
            # settlement goes on (and is kept and retried) while the last bytes go out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), SETTLE_WAIT_S)

    def settle(self) -> asyncio.Task[None] | None:
        """Settle in the background (once; None when it already was)."""
        if self.settled:
            return None
        self.settled = True
        ttft = self.first_token_at - self.started if self.first_token_at else None
        outcome = Outcome(self.used or Usage(), self.status, time.monotonic() - self.started,
                          ttft, self.user, client_disconnected=self.client_disconnected)
        return self.state.run_in_background(self.state.gate.settle(self.admission, outcome))


Endpoint = Callable[["Run", bytes], Awaitable[None]]
"""What an endpoint does with a request's body (see the module's docstring)."""


class Exchange(Response):
    """A whole exchange as an ASGI response: what a FastAPI route answers with, for an
    endpoint that reads its body itself."""

    def __init__(self, state: AppState, endpoint: Endpoint,
                 errors: ErrorStyle = OPENAI) -> None:
        super().__init__()
        self.state = state
        self.endpoint = endpoint
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await handle(self.state, scope, receive, send, self.endpoint, self.errors)


async def handle(state: AppState, scope: Scope, receive: Receive, send: Send,
                 endpoint: Endpoint, errors: ErrorStyle = OPENAI) -> None:
    """One request, from its check-in to its settlement; its errors in the `errors`
    style of its dialect."""
    reply = Reply(send, errors)
    async with checked_in(state, scope, reply) as ticket:
        if ticket is None:
            return
        try:
            body = await read_body(receive, scope["headers"], state.max_body_bytes,
                                   state.body_timeout_s)
        except APIError as exc:
            await reply.error(exc)
            return
        await Run(state, ticket, reply, endpoint).serve(body, receive)


@contextlib.asynccontextmanager
async def checked_in(state: AppState, scope: Scope, reply: Reply
                     ) -> AsyncIterator[Ticket | None]:
    """The caller checked in (before anything of the request is read) and checked out
    whatever happens; None, after the refusal was answered, when the check-in fails."""
    caller: Caller = scope["state"]["caller"]
    try:
        ticket = await state.gate.check_in(caller)
    except Exception as exc:  # a refusal (429), or a failure of modelyard's (a 500)
        await reply.error(as_api_error(exc))
        yield None
        return
    try:
        yield ticket
    finally:
        await state.gate.check_out(ticket)


@dataclass
class Run:
    """One request after its body was read: the endpoint's work, and the watch for the
    client."""

    state: AppState
    ticket: Ticket
    reply: Reply
    endpoint: Endpoint
    bill: Bill | None = None
    stream: ChatStream | None = None
    """The started work whose deltas the answer reads: closed (or drained) at the end."""
    client_gone: bool = False
    failed: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    """The admission's x-ratelimit-* headers, sent with the answer or its error."""
    started: float = field(default_factory=time.monotonic)

    def model(self, model_id: str) -> ChatModel:
        """The model the request names, if the caller may use it (404 otherwise)."""
        provider = self.state.providers.get(model_id)
        if provider is None or not self.state.gate.may_use(self.ticket.caller, model_id):
            raise model_not_found(model_id)
        return provider

    async def admit(self, model_id: str, prompt_tokens: int, completion_tokens: int,
                    user: str | None) -> Bill:
        """Admit the request for upper bounds of its tokens (all choices together); from
        here on it is billed whatever happens."""
        admission = await self.state.gate.admit(self.ticket, model_id, prompt_tokens,
                                                completion_tokens)
        self.headers = admission.headers
        self.bill = Bill(self.state, admission, user, self.started)
        return self.bill

    async def serve(self, body: bytes, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = asyncio.get_running_loop().create_task(self._watch(receive, task))
        try:
            await self._work(body)
        except asyncio.CancelledError:
            # the watcher's cancel is swallowed; any other (the server shutting down) is not
            if not self.client_gone or task.uncancel() > 0:
                self._ended(503)
                raise
            if self.bill is not None:
                self.bill.client_disconnected = True
                if not self.failed:  # an error it was being told keeps its status
                    self.bill.status = 200 if self.reply.started else CLIENT_CLOSED
        finally:
            watch.cancel()
            await self._finish()

    async def _watch(self, receive: Receive, work: asyncio.Task[Any]) -> None:
        """Cancel `work` when the client goes away before its answer was all sent (the
        answer's last send sets `finished` first, so a cancel lands only inside `_work`)."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server that cannot tell: assume the client stays
            return
        # not when the server stops: its own disconnects and cancels are the shutdown
        if not self.reply.finished and not work.cancelling() and not SHUTTING_DOWN.is_set():
            self.client_gone = True
            work.cancel()

    def _ended(self, status: int) -> None:
        if self.bill is not None and self.bill.status == 500:
            self.bill.status = status

    async def _work(self, body: bytes) -> None:
        try:
            await self.endpoint(self, body)
        except Exception as exc:  # a refusal, a failure mid-stream or a bug: billed
            await self._fail(as_api_error(exc))

    async def _fail(self, error: APIError) -> None:
        self.failed = True
        if self.bill is not None:
            self.bill.status = error.status
        error.headers = {**self.headers, **error.headers}
        await self.reply.error(error)

    async def _finish(self) -> None:
        """Settle the bill and stop the work, whatever happened."""
        bill, stream = self.bill, self.stream
        if bill is None:
            return
        if self.client_gone and stream is not None and not bill.settled:
            # an upstream goes on generating: read its usage (bounded) for the bill
            self.state.run_in_background(_settle_after_drain(stream, bill))
            return
        bill.settle()
        if stream is not None:
            # now, not when it is garbage collected: a request whose client went away
            # stops generating at once
            await stream.aclose()


async def _settle_after_drain(stream: ChatStream, bill: Bill) -> None:
    try:
        usage = await stream.drain_usage(bill.state.usage_drain_seconds)
        if usage is not None:
            bill.sent(usage)
        else:
            await stream.aclose()
    finally:
        bill.settle()


def model_not_found(model_id: str) -> APIError:
    return APIError(404, f"the model '{model_id}' does not exist or you do not have access "
                    "to it", param="model", code="model_not_found")
