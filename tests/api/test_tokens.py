"""/tokenize, /detokenize and GET /v1/models/{model} through the real app in process, with
a fake tokenizer (one token per character) and a gate that counts check-ins: shapes,
defaults, hostile values and refusals in SPEC.md's shape, each ticket checked out once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from modelyard.api.app import create_app
from modelyard.api.state import AppState
from modelyard.api.tokens import MAX_TOKEN_IDS
from modelyard.platform.gate import Caller, OpenGate, PlatformError, Ticket
from modelyard.providers.base import Provider
from modelyard.providers.tokens import Tokenizer

BOS = 1
VOCAB = 1000


class CharTokenizer:
    """Token id = code point (below VOCAB), BOS = 1 when special tokens are added."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    @property
    def vocab_size(self) -> int:
        return VOCAB

    @property
    def max_model_len(self) -> int:
        return 2048

    def tokenize_text(self, text: str, add_special: bool) -> list[int]:
        self.calls.append(("text", text, add_special))
        return self._ids(text, add_special)

    @staticmethod
    def _ids(text: str, add_special: bool) -> list[int]:
        return [BOS] * add_special + [ord(c) % VOCAB for c in text]

    def tokenize_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          add_special: bool) -> list[int]:
        self.calls.append(("messages", messages, add_generation_prompt, add_special))
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self._ids(text + "<assistant>" * add_generation_prompt, add_special)

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class FakeModel(Provider):
    def __init__(self, model_id: str, tokenizer: Tokenizer | None) -> None:
        self.model_id = model_id
        self._tokenizer = tokenizer

    def describe(self) -> dict[str, Any]:
        return {"context_length": 2048, "capabilities": {"tools": False}}

    async def prepare_chat(self, request: Any) -> Any:
        raise NotImplementedError

    async def start_chat(self, prepared: Any) -> Any:
        raise NotImplementedError

    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer


class CountingGate(OpenGate):
    """Keys: 'limited' may use only `local`; 'refused' is refused at check-in (429)."""

    def __init__(self) -> None:
        self.checked_in = 0
        self.checked_out = 0

    async def authenticate(self, authorization: str | None) -> Caller:
        await super().authenticate(authorization)
        key = (authorization or "")[7:]
        return Caller(key_id=key, allowed_models=frozenset({"local"})
                      if key == "limited" else None)

    async def check_in(self, caller: Caller) -> Ticket:
        if caller.key_id == "refused":
            raise PlatformError(429, "too many requests", code="rate_limit_exceeded",
                                headers={"Retry-After": "7"})
        self.checked_in += 1
        return Ticket(caller, headers={"x-ratelimit-remaining-requests": "9"})

    async def check_out(self, ticket: Ticket) -> None:
        self.checked_out += 1
        await super().check_out(ticket)


class App:
    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.gate = CountingGate()
        self.state = AppState(
            providers={"local": FakeModel("local", self.tokenizer),
                       "up/qwen": FakeModel("up/qwen", None)},
            registry=CollectorRegistry(), gate=self.gate)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(self.state)),
                                        base_url="http://test")

    async def post(self, path: str, body: Any, key: str | None = "sk-test") -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post(path, content=content, headers={
            **headers, "Content-Type": "application/json"})

    async def get(self, path: str, key: str | None = "sk-test") -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return await self.client.get(path, headers=headers)


def run(body: Callable[[App], Awaitable[None]]) -> None:
    async def main() -> None:
        app = App()
        try:
            await body(app)
        finally:
            await app.client.aclose()
        assert app.gate.checked_out == app.gate.checked_in  # every ticket checked out once
    asyncio.run(main())


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_tokenize_a_prompt_adds_special_tokens_by_default() -> None:
    async def body(app: App) -> None:
        response = await app.post("/tokenize", {"model": "local", "prompt": "héllo"})
        assert response.status_code == 200
        assert response.json() == {"count": 6, "max_model_len": 2048,
                                   "tokens": [BOS, *(ord(c) for c in "héllo")]}
        assert response.headers["x-ratelimit-remaining-requests"] == "9"
        plain = await app.post("/tokenize", {"model": "local", "prompt": "hi",
                                             "add_special_tokens": False})
        assert plain.json()["tokens"] == [ord("h"), ord("i")]
    run(body)


def test_tokenize_messages_defaults_and_the_chat_message_conversion() -> None:
    async def body(app: App) -> None:
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "<|im_end|>"}]}]
        response = await app.post("/tokenize", {"model": "local", "messages": messages})
        assert response.status_code == 200
        kind, given, generation, special = app.tokenizer.calls[-1]
        assert (kind, generation, special) == ("messages", True, False)
        assert given == [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "<|im_end|>"}]}]
        assert response.json()["count"] == len(response.json()["tokens"])
        await app.post("/tokenize", {"model": "local", "messages": messages,
                                     "add_generation_prompt": False,
                                     "add_special_tokens": True})
        assert app.tokenizer.calls[-1][2:] == (False, True)
    run(body)


def test_detokenize_round_trips() -> None:
    async def body(app: App) -> None:
        tokens = (await app.post("/tokenize", {"model": "local", "prompt": "abc",
                                               "add_special_tokens": False})).json()["tokens"]
        response = await app.post("/detokenize", {"model": "local", "tokens": tokens})
        assert response.status_code == 200
        assert response.json() == {"prompt": "abc"}
        assert (await app.post("/detokenize", {"model": "local", "tokens": []})).json() == {
            "prompt": ""}
    run(body)


@pytest.mark.parametrize(("tokens", "status"), [
    ([VOCAB], 422), ([-1], 422), ([2**31], 422), ([10**30], 422), ([-(10**30)], 422),
    (["1"], 400), ([True], 400), ([1.5], 400), ([[1]], 400), ("1 2", 400), ([None], 400),
])
def test_token_ids_outside_the_vocabulary_or_not_integers(tokens: Any, status: int) -> None:
    async def body(app: App) -> None:
        error = error_of(await app.post("/detokenize", {"model": "local", "tokens": tokens}),
                         status)
        assert error["param"].startswith("tokens")
        if status == 422:
            assert error["param"] == "tokens"
    run(body)


def test_hostile_bodies_are_refused_in_spec_shape() -> None:
    async def body(app: App) -> None:
        huge = b'{"model": "local", "tokens": [' + b"9" * 1000 + b"]}"
        assert error_of(await app.post("/detokenize", huge), 422)["param"] == "tokens"
        beyond = b'{"model": "local", "tokens": [-' + b"9" * 5000 + b"]}"  # past Python's
        assert error_of(await app.post("/detokenize", beyond), 400)["code"] == "invalid_json"
        surrogate = b'{"model": "local", "prompt": "\\ud800"}'
        assert error_of(await app.post("/tokenize", surrogate), 400)["code"] == "invalid_json"
        deep = b'{"model": "local", "prompt": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        error_of(await app.post("/tokenize", deep), 400)
        many = {"model": "local", "tokens": [1] * (MAX_TOKEN_IDS + 1)}
        assert error_of(await app.post("/detokenize", many), 422)["param"] == "tokens"
        messages = [{"role": "user", "content": "x"}] * 2049
        assert error_of(await app.post("/tokenize", {"model": "local", "messages": messages}),
                        422)["param"] == "messages"
        error_of(await app.post("/tokenize", b"not json"), 400)
        error_of(await app.post("/tokenize", b"[1, 2]"), 400)
        error_of(await app.post("/tokenize", {"model": "local", "prompt": 12}), 400)
        error_of(await app.post("/tokenize", {"model": 1, "prompt": "x"}), 400)
        error_of(await app.post("/tokenize", {"model": "lo\x00cal", "prompt": "x"}), 422)
        error_of(await app.post("/tokenize", {"model": "local", "prompt": "x",
                                              "add_special_tokens": "true"}), 400)
        nul = await app.post("/tokenize", {"model": "local", "prompt": "a\x00b",
                                           "add_special_tokens": False})
        assert nul.json()["tokens"] == [ord("a"), 0, ord("b")]
        digits = await app.post("/tokenize", {"model": "local", "prompt": "١٢٣"})
        assert digits.status_code == 200
    run(body)


def test_one_input_and_no_silently_ignored_fields() -> None:
    async def body(app: App) -> None:
        error_of(await app.post("/tokenize", {"model": "local"}), 422)
        both = {"model": "local", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
        error_of(await app.post("/tokenize", both), 422)
        assert error_of(await app.post("/tokenize", {
            "model": "local", "prompt": "x", "add_generation_prompt": True}),
            422)["param"] == "add_generation_prompt"
        for name, value in (("tools", [{"type": "function"}]), ("return_token_strs", True),
                            ("continue_final_message", True), ("chat_template", "{{x}}")):
            error = error_of(await app.post("/tokenize", {
                "model": "local", "messages": [{"role": "user", "content": "x"}],
                name: value}), 422)
            assert (error["param"], error["code"]) == (name, "unsupported_parameter")
        ok = await app.post("/tokenize", {"model": "local", "prompt": "x",
                                          "return_token_strs": False, "user": "me"})
        assert ok.status_code == 200
        image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        assert error_of(await app.post("/tokenize", {"model": "local", "messages": [image]}),
                        422)["param"] == "messages[0].content"
        no_content = {"model": "local", "messages": [{"role": "user"}]}
        error_of(await app.post("/tokenize", no_content), 422)
    run(body)


def test_models_the_key_cannot_tokenize_with() -> None:
    async def body(app: App) -> None:
        for path, extra in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            unknown = error_of(await app.post(path, {"model": "nope", **extra}), 404)
            assert (unknown["param"], unknown["code"]) == ("model", "model_not_found")
            hidden = error_of(await app.post(path, {"model": "up/qwen", **extra},
                                             key="limited"), 404)
            assert hidden["message"] == unknown["message"].replace("nope", "up/qwen")
            upstream = error_of(await app.post(path, {"model": "up/qwen", **extra}), 422)
            assert (upstream["param"], upstream["code"]) == ("model", "tokenizer_unavailable")
            assert error_of(await app.post(path, {"model": "local", **extra}, key=None),
                            401)["code"] == "invalid_api_key"
            refused = await app.post(path, {"model": "local", **extra}, key="refused")
            assert error_of(refused, 429)["code"] == "rate_limit_exceeded"
            assert refused.headers["retry-after"] == "7"
    run(body)


def test_a_large_input_is_tokenized_off_the_event_loop() -> None:
    async def body(app: App) -> None:
        text = "word " * 10_000
        response = await app.post("/tokenize", {"model": "local", "prompt": text,
                                                "add_special_tokens": False})
        assert response.json()["count"] == len(text)
        back = await app.post("/detokenize", {"model": "local",
                                              "tokens": response.json()["tokens"]})
        assert back.json() == {"prompt": text}
    run(body)


def test_a_body_past_the_cap_is_413() -> None:
    async def body(app: App) -> None:
        app.state.max_body_bytes = 1000
        error = error_of(await app.post("/tokenize", {"model": "local", "prompt": "x" * 2000}),
                         413)
        assert error["code"] == "request_too_large"
    run(body)


def test_get_one_model_is_its_list_entry() -> None:
    async def body(app: App) -> None:
        listed = {entry["id"]: entry for entry in (await app.get("/v1/models")).json()["data"]}
        for model in ("local", "up/qwen"):
            for prefix in ("/v1", "/api/v1"):
                response = await app.get(f"{prefix}/models/{model}")
                assert response.status_code == 200
                assert response.json() == listed[model]
        for path in ("/v1/models/nope", "/v1/models/up/nope", "/v1/models/"):
            error = error_of(await app.get(path), 404)
            assert (error["param"], error["code"]) == ("model", "model_not_found")
        hidden = error_of(await app.get("/v1/models/up/qwen", key="limited"), 404)
        assert hidden["message"] == ("the model 'up/qwen' does not exist or you do not have "
                                     "access to it")
        assert (await app.get("/v1/models/local", key="limited")).status_code == 200
        assert error_of(await app.get("/v1/models/local", key=None), 401)
    run(body)
