"""Hostile and broken upstreams against the router's own code: the real fault upstream
process (tests/router/fault_server.py) behind real sockets, no gateway in between (the
e2e tests in tests/e2e/test_upstreams.py take the same faults through a server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from modelyard.config import CatalogModelConfig, DeploymentConfig, RouterConfig
from modelyard.providers.base import ChatDelta, ChatRequest, ProviderError, StreamError
from modelyard.providers.openai_compat import UpstreamDeployment, UpstreamError, public_message
from modelyard.router.catalog import RoutedModel
from tests.router.fault_process import running_fault_server

LEAKED = ("10.9.8.7", "gpu-7", "sk-live", "http", "127.0.0.1", "\n")
"""What the fault server's `leak` error holds (and its own address): none may reach a
client."""


@pytest.fixture(scope="module")
def fault() -> Iterator[str]:
    with running_fault_server() as url:
        yield url


def _routed(fault: str, *upstreams: str, **options: Any) -> RoutedModel:
    deployments = tuple(DeploymentConfig(base_url=f"{fault}/v1", upstream_model=upstream,
                                         name=f"d{i}", **options)
                        for i, upstream in enumerate(upstreams))
    config = CatalogModelConfig(id="m", deployments=deployments)
    return RoutedModel(config, RouterConfig(),
                       [UpstreamDeployment(d, None) for d in deployments])


def _request(stream: bool, content: str = "hi", **fields: Any) -> ChatRequest:
    return ChatRequest("req-1", [{"role": "user", "content": content}], stream=stream,
                       max_tokens=16, **fields)


async def _answer(model: RoutedModel, request: ChatRequest,
                  ) -> tuple[list[ChatDelta], BaseException | None]:
    """The deltas read, and what ended them with an error (None: a clean end); at most
    5 s, so a stream that never ends fails the test instead of hanging it."""
    deltas: list[ChatDelta] = []
    try:
        async with asyncio.timeout(5):
            prepared = await model.prepare_chat(request)
            async for delta in await model.start_chat(prepared):
                deltas.append(delta)
    except (ProviderError, StreamError) as exc:
        return deltas, exc
    finally:
        await model.close()
    return deltas, None


def _received(fault: str) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = httpx.get(f"{fault}/requests", timeout=5).json()
    return received


def _clear(fault: str) -> None:
    httpx.delete(f"{fault}/requests", timeout=5)


def test_an_upstream_sending_only_comments_is_cut_at_the_total_timeout(fault: str) -> None:
    """One token, then an SSE comment every 10 ms: the read timeout never trips, and the
    total timeout used to be checked only between events, so it held the request (and
    its reservation) for ever."""
    model = _routed(fault, "comments:C", total_timeout=0.5)
    started = time.monotonic()
    deltas, error = asyncio.run(_answer(model, _request(stream=True)))
    assert "".join(d.text for d in deltas) == "C"
    assert isinstance(error, StreamError)
    assert str(error) == "the upstream deployment timed out (request req-1)"
    assert time.monotonic() - started < 3
    deployment = model.routes[0].deployment
    assert deployment.active == 0 and model.routes[0].breaker.consecutive == 1


def test_informational_heads_before_the_answer_are_skipped(fault: str) -> None:
    for stream in (True, False):
        deltas, error = asyncio.run(_answer(_routed(fault, "continue:K"), _request(stream)))
        assert error is None and "".join(d.text for d in deltas) == "K"


def test_a_request_the_upstream_hung_up_on_is_not_sent_again(fault: str) -> None:
    """The upstream read the request and closed without answering, on a kept-alive
    connection: the client used to resend it on a new connection (a second generation)."""
    async def main() -> UpstreamError:
        deployment = UpstreamDeployment(DeploymentConfig(base_url=f"{fault}/v1"), None)
        try:
            body = {"model": "ok", "messages": [], "stream": False}
            stream = await deployment.open(body, 1, lambda failed: None)
            async for _ in stream:
                pass  # its connection goes back to the pool
            with pytest.raises(UpstreamError) as failed:
                await deployment.open({**body, "model": "hangup"}, 1, lambda failed: None)
            return failed.value
        finally:
            await deployment.close()
    _clear(fault)
    error = asyncio.run(main())
    assert [body["model"] for body in _received(fault)] == ["ok", "hangup"]
    assert error.status == 502 and error.retriable  # another deployment may take it
    assert "without answering" in error.message


def test_an_oversized_event_or_answer_is_refused(fault: str) -> None:
    deltas, error = asyncio.run(_answer(_routed(fault, "huge=2000000:H"), _request(True)))
    assert "".join(d.text for d in deltas) == "H"  # the event over 1 MiB is not
    assert isinstance(error, StreamError) and "request req-1" in str(error)

    _clear(fault)  # 17 MB of answer: over the 16 MiB cap; generated, so not sent elsewhere
    model = _routed(fault, "huge=17000000:H", "huge=17000000:I")
    _, error = asyncio.run(_answer(model, _request(False)))
    assert isinstance(error, ProviderError) and error.status == 502
    assert error.message == "the upstream deployment failed (request req-1)"
    assert len(_received(fault)) == 1


@pytest.mark.parametrize("mode", ["nulllogprob", "badtypes"])
def test_a_malformed_event_is_the_streams_error_and_a_malformed_answer_a_502(
        fault: str, mode: str) -> None:
    """`"logprob": null` or content that is a number used to raise a TypeError out of the
    stream (an unhandled exception: a 500, and a reservation left behind)."""
    deltas, error = asyncio.run(_answer(_routed(fault, f"{mode}:M"),
                                        _request(True, logprobs=True)))
    assert "".join(d.text for d in deltas) == "M"
    assert isinstance(error, StreamError)
    assert str(error) == "the upstream deployment failed (request req-1)"

    _clear(fault)  # whole: a 502, and not asked of the second deployment
    deltas, error = asyncio.run(_answer(_routed(fault, f"{mode}:M", f"{mode}:N"),
                                        _request(False, logprobs=True)))
    assert deltas == [] and isinstance(error, ProviderError) and error.status == 502
    assert len(_received(fault)) == 1


def test_upstream_errors_reach_the_client_opaque_or_sanitized(fault: str) -> None:
    def refused(status: int) -> ProviderError:
        _, error = asyncio.run(_answer(_routed(fault, f"leak={status}"), _request(False)))
        assert isinstance(error, ProviderError)
        assert not any(word in error.message for word in LEAKED), error.message
        return error

    for status in (400, 422):  # the client's own parameter: passed on, sanitized
        error = refused(status)
        assert error.status == status and error.code == "upstream_refused"
        assert error.message.startswith("the upstream rejected the request: ")
        assert error.message.endswith("max_tokens is too large")
        assert error.param == "max_tokens"
    for status in (401, 403):  # our own key refused: the deployment's fault, a 502
        error = refused(status)
        assert error.status == 502 and error.code == "upstream_error"
        assert error.message == "the upstream deployment failed (request req-1)"
    error = refused(500)
    assert error.status == 503 and error.retry_after
    assert error.message == "no deployment of m could answer (request req-1)"


def test_public_messages_keep_no_address_url_or_key() -> None:
    message = public_message("bad value at https://x.internal/v1?key=1 from 10.0.0.5:8000, "
                             "[fe80::1]:80, ::1, api.example.com:443, Bearer abc.def, "
                             "sk-proj-abcdefghijk, hf_abcdefghijkl\x00\n\ttail " + "z" * 400)
    for secret in ("https", "x.internal", "10.0.0.5", "fe80", "::1", "example.com", "abc.def",
                   "sk-proj", "hf_", "\x00", "\n"):
        assert secret not in message
    assert message.startswith("bad value at <url> from <address>, <address>, <address>, "
                              "<address>, <credential>, <credential>, <credential> tail ")
    assert len(message) == 200 and message.endswith("...")
    assert public_message("std::vector must be a list, see messages[0].content") == \
        "std::vector must be a list, see messages[0].content"


def test_reservations_and_estimates_bound_cjk_text_from_above(fault: str) -> None:
    """Characters / 4 reserved a quarter of a CJK prompt's cost; the bound is UTF-8 bytes
    (no token of a byte-level BPE is shorter than a byte), for the reservation and for
    usage estimated when the upstream reports none."""
    prompt = "你好世界" * 500  # 6,000 bytes
    model = _routed(fault, "nousage:你好世界")
    deltas, error = asyncio.run(_answer(model, _request(True, prompt)))
    assert error is None and "".join(d.text for d in deltas) == "你好世界"
    last = deltas[-1]
    assert last.usage.estimated
    assert last.usage.prompt_tokens >= len(prompt.encode())
    assert last.usage.completion_tokens >= len("你好世界".encode())
