"""Profiles: how SPEC.md's parameters reach a family of upstream servers, and how their
answers are read back.

Every profile sends OpenAI's own parameters as they are. The extra SPEC.md parameters
(top_k, min_p, repetition_penalty, enable_thinking, ...) travel the way each server
family understands them; one a profile cannot express is dropped (logged at debug),
except with the `openai` profile, which refuses it with a 422 naming it unless the model
allows dropping.
"""

from __future__ import annotations

import logging
from typing import Any

from modelyard.providers.base import ChatRequest, ProviderError
from modelyard.sampling import Sampling

logger = logging.getLogger(__name__)

_OPENAI_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed")


def extra_parameters(request: ChatRequest) -> dict[str, Any]:
    """The SPEC.md parameters OpenAI's API lacks that this request sets."""
    sampling = request.sampling
    extras: dict[str, Any] = {
        "top_k": sampling.top_k, "min_p": sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty,
        "enable_thinking": request.enable_thinking, "thinking_budget": request.thinking_budget,
    }
    if request.include_stop_str_in_output:
        extras["include_stop_str_in_output"] = True
    if not request.separate_reasoning:
        extras["separate_reasoning"] = False
    if not request.truncate_to_context:
        extras["context_length_exceeded_behavior"] = "error"
    return {name: value for name, value in extras.items() if value is not None}


def build_body(profile: str, request: ChatRequest, upstream_model: str, max_tokens: int,
               defaults: Sampling, drop_unsupported: bool = False) -> dict[str, Any]:
    """The JSON body sent upstream: streamed (with usage asked for) when the client asked
    for a stream, one JSON answer (which carries usage anyway) when it did not."""
    raw = request.prompt
    body: dict[str, Any] = {"model": upstream_model}
    if raw is None:
        body["messages"] = request.messages
    else:  # a text completion (POST {base_url}/completions)
        body["prompt"] = list(raw.token_ids) if raw.token_ids is not None else raw.text
        if raw.suffix is not None:
            body["suffix"] = raw.suffix
        if raw.echo:
            body["echo"] = True
    body["stream"] = request.stream
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    body["max_completion_tokens" if profile == "openai" and raw is None
         else "max_tokens"] = max_tokens
    sampling = request.sampling_over(defaults).given()
    for name in _OPENAI_FIELDS:
        value = sampling.pop(name, None) if name != "seed" else request.seed
        if value is not None:
            body[name] = value
    if request.n != 1:
        body["n"] = request.n
    if request.stop:
        body["stop"] = list(request.stop)
    if request.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
    if request.logprobs and raw is not None:
        body["logprobs"] = request.top_logprobs  # the legacy form: how many alternatives
    elif request.logprobs:
        body["logprobs"] = True
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
    if request.tools:
        body["tools"] = request.tools
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    if request.response_format is not None:
        body["response_format"] = request.response_format
    if request.reasoning_effort is not None:
        body["reasoning_effort"] = request.reasoning_effort
    extras = extra_parameters(request)
    for name in ("top_k", "min_p", "repetition_penalty"):  # model defaults count too
        if name in sampling and name not in extras and profile != "openai":
            extras[name] = sampling[name]
    unsent = _EXTRAS[profile](body, extras)
    if unsent and profile == "openai" and not drop_unsupported:
        names = ", ".join(sorted(unsent))
        raise ProviderError(422, f"this model does not support the parameter(s) {names}",
                            param=sorted(unsent)[0], code="unsupported_parameter")
    if unsent:
        logger.debug("dropped for profile %s: %s", profile, ", ".join(sorted(unsent)))
    return body


def _thinking_kwargs(body: dict[str, Any], extras: dict[str, Any]) -> None:
    if "enable_thinking" in extras:
        body["chat_template_kwargs"] = {"enable_thinking": extras.pop("enable_thinking")}


def _vllm(body: dict[str, Any], extras: dict[str, Any]) -> set[str]:
    for name in ("top_k", "min_p", "repetition_penalty", "include_stop_str_in_output"):
        if name in extras:
            body[name] = extras.pop(name)
    _thinking_kwargs(body, extras)
    return set(extras)


def _sglang(body: dict[str, Any], extras: dict[str, Any]) -> set[str]:
    for name in ("top_k", "min_p", "repetition_penalty", "separate_reasoning"):
        if name in extras:
            body[name] = extras.pop(name)
    _thinking_kwargs(body, extras)
    return set(extras)


def _llamacpp(body: dict[str, Any], extras: dict[str, Any]) -> set[str]:
    for name in ("top_k", "min_p"):
        if name in extras:
            body[name] = extras.pop(name)
    if "repetition_penalty" in extras:
        body["repeat_penalty"] = extras.pop("repetition_penalty")
    _thinking_kwargs(body, extras)
    return set(extras)


def _ollama(body: dict[str, Any], extras: dict[str, Any]) -> set[str]:
    options: dict[str, Any] = {name: extras.pop(name) for name in ("top_k", "min_p")
                               if name in extras}
    if "repetition_penalty" in extras:
        options["repeat_penalty"] = extras.pop("repetition_penalty")
    if options:
        body["options"] = options
    if "enable_thinking" in extras:
        body["think"] = extras.pop("enable_thinking")
    return set(extras)


def _openai(body: dict[str, Any], extras: dict[str, Any]) -> set[str]:
    return set(extras)


def _passthrough(body: dict[str, Any], extras: dict[str, Any]) -> set[str]:
    body.update(extras)
    return set()


_EXTRAS = {"vllm": _vllm, "sglang": _sglang, "llamacpp": _llamacpp, "ollama": _ollama,
           "openai": _openai, "passthrough": _passthrough}

REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
"""Where upstreams put reasoning text in a message or delta; read back as reasoning_content."""


def reasoning_of(delta: dict[str, Any]) -> str:
    for name in REASONING_FIELDS:
        value = delta.get(name)
        if isinstance(value, str) and value:
            return value
    return ""
