"""What the native upstream APIs (Anthropic's Messages, Google's Gemini) share when a
`ChatRequest` is put in their terms: the parameters neither can express, reading OpenAI
message content (text and image parts), a tool call's arguments as an object, and the
thinking budget a request asks for.

A parameter the request sets that the API cannot express is refused with a 422 naming it
(`Unsupported.check`), unless the model drops unsupported parameters; one that only the
model's own defaults set is never sent and never refused (the configuration's, not the
client's).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import orjson

from modelyard.providers.base import ChatRequest, ProviderError

logger = logging.getLogger(__name__)

DEFAULT_THINKING_BUDGET = 4096
"""SPEC.md's thinking_budget default, for a request that turns thinking on without one."""

EFFORT_BUDGETS = {"none": 0, "minimal": 0, "low": 1024, "medium": 4096, "high": 16384}
"""reasoning_effort as a thinking budget (0: thinking off)."""


class Unsupported:
    """The parameters of one request that an API cannot express."""

    def __init__(self, api: str, drop: bool) -> None:
        self.api = api
        self.drop = drop
        self.names: list[str] = []

    def add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def common(self, request: ChatRequest, sampling: frozenset[str]) -> None:
        """What neither native API has: the request's sampling fields outside `sampling`,
        logit_bias, logprobs, the stop text kept in the output, reasoning left inline; a
        text completion is refused outright (these APIs are chat only)."""
        if request.prompt is not None:
            raise ProviderError(422, f"this model answers chat requests only (its "
                                f"deployment speaks {self.api})", param="prompt",
                                code="unsupported_parameter")
        for name in request.sampling.given():
            if name not in sampling:
                self.add(name)
        if request.logit_bias:
            self.add("logit_bias")
        if request.logprobs:
            self.add("logprobs")
        if request.include_stop_str_in_output:
            self.add("include_stop_str_in_output")
        if not request.separate_reasoning:
            self.add("separate_reasoning")

    def check(self) -> None:
        """Raise the 422 for what was found, or log what is dropped."""
        if not self.names:
            return
        names = ", ".join(self.names)
        if not self.drop:
            raise ProviderError(422, f"this model does not support the parameter(s) {names} "
                                f"(its deployment speaks {self.api})", param=self.names[0],
                                code="unsupported_parameter")
        logger.debug("dropped for %s: %s", self.api, names)


def refused(message: str, param: str) -> ProviderError:
    return ProviderError(422, message, param=param, code="unsupported_parameter")


@dataclass(frozen=True)
class Image:
    """An image part: inline bytes (base64 `data` and its media type) or a URL."""

    media_type: str
    data: str = ""
    url: str = ""


Part = str | Image
"""A user message's part: its text, or an image."""

_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)",
                       re.DOTALL)
_EXTENSION_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
                    "gif": "image/gif", "webp": "image/webp", "heic": "image/heic"}


def parts(content: Any, param: str) -> list[Part]:
    """A message's OpenAI content (a string or text and image_url parts) as text and
    images, empty texts left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    out: list[Part] = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                out.append(str(part["text"]))
        elif kind == "image_url":
            out.append(_image(part.get("image_url"), f"{param}[{i}]"))
        else:
            raise refused(f"content parts of type {kind!r} cannot be sent to this model",
                          f"{param}[{i}]")
    return out


def text_of(content: Any, param: str) -> str:
    """A message's content that may hold only text (a system or tool message)."""
    texts = []
    for part in parts(content, param):
        if isinstance(part, Image):
            raise refused("only user messages may hold images", param)
        texts.append(part)
    return "".join(texts)


def _image(raw: Any, param: str) -> Image:
    url = raw.get("url") if isinstance(raw, dict) else raw
    if not isinstance(url, str) or not url:
        raise refused("an image_url part needs a url", param)
    match = _DATA_URL.fullmatch(url)
    if match:
        return Image(match["type"], data=match["data"])
    if url.startswith(("http://", "https://")):
        extension = url.split("?", 1)[0].rsplit(".", 1)[-1].lower()
        return Image(_EXTENSION_TYPES.get(extension, "image/jpeg"), url=url)
    raise refused("an image must be a base64 data URL or an http(s) URL", param)


def arguments(raw: Any, param: str) -> dict[str, Any]:
    """A tool call's arguments (a JSON text) as the object the native APIs take."""
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise refused("a tool call's arguments must be a JSON object", param)
    return value


def thinking_budget(request: ChatRequest) -> int | None:
    """The thinking budget the request asks for: None (nothing asked: the model's own
    default), 0 (thinking off) or a number of tokens."""
    if request.enable_thinking is False:
        return 0
    if request.thinking_budget is not None:
        return request.thinking_budget
    if request.reasoning_effort is not None:
        return EFFORT_BUDGETS.get(request.reasoning_effort, DEFAULT_THINKING_BUDGET)
    if request.enable_thinking:
        return DEFAULT_THINKING_BUDGET
    return None


def tool_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """The name of every tool call the conversation's assistant messages made, by id."""
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            if call.get("id") and function.get("name"):
                names[call["id"]] = function["name"]
    return names
