"""/tokenize, /detokenize (httpx: the SDK has no method for them) and GET /v1/models/{id}
(the SDK's `models.retrieve`) against the session's real server, and a model id with a
slash through a gateway whose catalog routes to it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer, running_server

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Say hi."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Repeat <|im_start|>system and <|im_end|> literally 🌞"}],
    [{"role": "user", "content": [{"type": "text", "text": "one"},
                                  {"type": "text", "text": "two"}]},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "three?"}],
]


def _post(server: RunningServer, key: str | None, path: str, body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=60)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_tokenize_counts_what_chat_bills(server: RunningServer, api_key: str,
                                         client: openai.OpenAI,
                                         messages: list[dict[str, Any]]) -> None:
    counted = _post(server, api_key, "/tokenize", {"model": MODEL, "messages": messages})
    assert counted.status_code == 200, counted.text
    answer = counted.json()
    assert set(answer) == {"count", "max_model_len", "tokens"}
    assert answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == 2048
    reply = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                           max_tokens=1)
    assert reply.usage is not None
    assert answer["count"] == reply.usage.prompt_tokens


def test_detokenize_round_trips(server: RunningServer, api_key: str) -> None:
    text = "def add(a, b):\n    return a + b  # émojis 🌞 and <|im_end|>"
    tokens = _post(server, api_key, "/tokenize", {"model": MODEL, "prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 5
    back = _post(server, api_key, "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})
    assert back.status_code == 200
    assert back.json() == {"prompt": text}


def test_refusals(server: RunningServer, api_key: str) -> None:
    for path, extra in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        assert _error(_post(server, None, path, {"model": MODEL, **extra}),
                      401)["code"] == "invalid_api_key"
        unknown = _error(_post(server, api_key, path, {"model": "nope", **extra}), 404)
        assert (unknown["param"], unknown["code"]) == ("model", "model_not_found")
    vocab = _post(server, api_key, "/detokenize", {"model": MODEL, "tokens": [1, 10**9]})
    assert _error(vocab, 422)["param"] == "tokens"
    assert "vocabulary" in vocab.json()["error"]["message"]
    narrow = server.create_key("narrow-tokens", balance="1", models=["some/other-model"])
    hidden = _error(_post(server, narrow, "/tokenize", {"model": MODEL, "prompt": "hi"}), 404)
    assert hidden["code"] == "model_not_found"


def test_a_keys_request_rate_applies(server: RunningServer) -> None:
    rpm = 2
    key = server.create_key("tokens-limited", balance="1", rpm=rpm)
    started = time.monotonic()
    allowed = 0
    while True:
        response = _post(server, key, "/tokenize", {"model": MODEL, "prompt": "hi"})
        if response.status_code == 429:
            break
        assert response.status_code == 200, response.text
        allowed += 1
        assert allowed <= 3 * rpm, "never refused"
    refills = int((time.monotonic() - started) * rpm / 60)
    assert rpm <= allowed <= rpm + refills
    assert _error(response, 429)["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["retry-after"]) <= 60


def test_retrieve_a_model(client: openai.OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL
    assert model.model_dump() == listed[MODEL].model_dump()
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope/not-a-model")
    assert caught.value.response.json()["error"]["code"] == "model_not_found"


@pytest.fixture(scope="module")
def gateway(server: RunningServer, api_key: str, data_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A gateway with no engine of its own: one catalog model, `up/qwen`, served by the
    session's server."""
    config = (f'[[models]]\nid = "up/qwen"\ncontext_length = 2048\n\n'
              f'[[models.deployments]]\nbase_url = "{server.base_url}/v1"\n'
              f'upstream_model = "{MODEL}"\nprofile = "passthrough"\n'
              f'api_key_env = "MODELYARD_TEST_TOKENS_UPSTREAM_KEY"\n')
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELYARD_TEST_TOKENS_UPSTREAM_KEY", api_key)
        with running_server(data_dir, config, tmp_path_factory.mktemp("gateway")) as running:
            yield running


def test_a_model_id_with_a_slash(gateway: RunningServer) -> None:
    key = gateway.create_key("slash", balance="1")
    with openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0,
                       timeout=60) as sdk:
        model = sdk.models.retrieve("up/qwen")
        assert model.id == "up/qwen"
        assert model.model_dump() == next(m for m in sdk.models.list()
                                          if m.id == "up/qwen").model_dump()
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("up/other")
    # its tokenizer lives on the upstream: a 422 naming the model, not a guess
    upstream = _post(gateway, key, "/tokenize", {"model": "up/qwen", "prompt": "hi"})
    assert (_error(upstream, 422)["param"], upstream.json()["error"]["code"]) == (
        "model", "tokenizer_unavailable")
