"""Render chat messages into a prompt with the Jinja chat template stored in the GGUF.

The template runs in Jinja's immutable sandbox (a template comes with downloaded weights
and is not trusted), with the globals and filters Hugging Face's tokenizers provide.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelyard.errors import ModelyardError

# ChatML, used when a model's GGUF carries no template of its own.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateError(ModelyardError, ValueError):
    """The messages cannot be rendered by this model's template (the template said why)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader()
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source or FALLBACK_TEMPLATE
        try:
            self._template = environment.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"the model's chat template does not parse: {exc}") from exc
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        try:
            return self._template.render(
                messages=[normalize_message(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                **extra,
            )
        except TemplateError:
            raise
        except Exception as exc:  # a template is code from the model file: any failure is its
            raise TemplateError(f"the model's chat template failed: {exc}") from exc


def normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Shape a message the way chat templates expect: string content, `developer` as system."""
    result = dict(message)
    if result.get("role") == "developer":
        result["role"] = "system"
    content = result.get("content")
    if isinstance(content, list):
        result["content"] = "\n".join(
            part.get("text", "") for part in content if part.get("type") == "text"
        )
    elif content is None and "content" in result and not result.get("tool_calls"):
        result["content"] = ""
    if result.get("tool_calls"):
        # Templates write arguments as JSON themselves: give them objects, not JSON text.
        result["tool_calls"] = [_with_parsed_arguments(call) for call in result["tool_calls"]]
    return result


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}
