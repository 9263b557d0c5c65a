"""End-to-end: errors in SPEC.md's shape and status, through the official SDK."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer

HELLO = [{"role": "user", "content": "hello"}]


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def test_malformed_json_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", content=b'{"model": "x", "messages": [',
                    cast_to=object, options={"headers": {"Content-Type": "application/json"}})
    assert caught.value.status_code == 400
    assert _error(caught.value)["code"] == "invalid_json"


def test_a_body_that_is_not_an_object_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=[1, 2, 3], cast_to=object)
    assert caught.value.status_code == 400


def test_wrong_json_type_is_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO,
                                       temperature="hot")  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    assert _error(caught.value)["param"] == "temperature"


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 2.5), ("top_p", 0), ("max_tokens", 0), ("stop", ["a", "b", "c", "d", "e"]),
])
def test_out_of_range_values_are_422(client: openai.OpenAI, field: str, value: object) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO,
                                       **{field: value})  # type: ignore[call-overload]
    assert _error(caught.value)["param"] == field


def test_inconsistent_parameters_are_422_naming_them(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, tool_choice="required")
    assert _error(caught.value)["param"] == "tool_choice"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no/such-model", messages=HELLO)
    error = _error(caught.value)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


def test_prompt_longer_than_the_context_is_422(client: openai.OpenAI) -> None:
    long_text = "word " * 3000
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": long_text}])
    assert _error(caught.value)["code"] == "context_length_exceeded"


def test_context_behaviour_error_refuses_and_truncate_lowers_max_tokens(
        client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=5000,
            extra_body={"context_length_exceeded_behavior": "error"})
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5000,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_missing_key_is_401(server: RunningServer) -> None:
    response = httpx.post(f"{server.api_url}/chat/completions",
                          json={"model": MODEL, "messages": HELLO}, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
