"""The profiles' translation of SPEC.md parameters into an upstream's request body."""

from __future__ import annotations

import pytest

from modelyard.providers.base import ChatRequest, ProviderError
from modelyard.providers.profiles import build_body
from modelyard.sampling import SAMPLING_FIELDS, Sampling

MESSAGES = [{"role": "user", "content": "hi"}]


def _request(**fields: object) -> ChatRequest:
    sampling = Sampling(**{k: fields.pop(k) for k in list(fields)  # type: ignore[arg-type]
                           if k in SAMPLING_FIELDS})
    return ChatRequest("r", MESSAGES, sampling=sampling, **fields)  # type: ignore[arg-type]


def test_vllm_sends_its_native_parameters_and_thinking_as_template_kwargs() -> None:
    request = _request(top_k=20, min_p=0.1, repetition_penalty=1.1, enable_thinking=False,
                       temperature=0.3)
    body = build_body("vllm", request, "up", 64, Sampling())
    assert body["top_k"] == 20 and body["min_p"] == 0.1 and body["repetition_penalty"] == 1.1
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["stream"] is False and "stream_options" not in body
    assert body["max_tokens"] == 64 and body["model"] == "up" and body["temperature"] == 0.3


def test_a_streamed_request_asks_the_upstream_for_a_stream_with_usage() -> None:
    body = build_body("vllm", _request(stream=True), "up", 64, Sampling())
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_llamacpp_and_ollama_rename() -> None:
    assert build_body("llamacpp", _request(repetition_penalty=1.2), "m", 8, Sampling())[
        "repeat_penalty"] == 1.2
    body = build_body("ollama", _request(top_k=5, enable_thinking=True), "m", 8, Sampling())
    assert body["options"] == {"top_k": 5} and body["think"] is True


def test_openai_refuses_what_it_lacks_unless_dropping_is_allowed() -> None:
    with pytest.raises(ProviderError) as refused:
        build_body("openai", _request(top_k=5, min_p=0.1), "gpt", 8, Sampling())
    assert refused.value.status == 422 and "min_p, top_k" in refused.value.message
    body = build_body("openai", _request(top_k=5), "gpt", 8, Sampling(), drop_unsupported=True)
    assert "top_k" not in body and body["max_completion_tokens"] == 8


def test_model_defaults_fill_what_the_request_leaves_out() -> None:
    body = build_body("passthrough", _request(temperature=0.9), "m", 8,
                      Sampling(temperature=0.1, top_k=40))
    assert body["temperature"] == 0.9 and body["top_k"] == 40
