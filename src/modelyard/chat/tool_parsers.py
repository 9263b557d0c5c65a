"""Tool-call parsers, one per model family, that work on streamed text.

A parser is fed the text of one choice as it is generated and splits it into plain content
and complete tool calls. Families register in `TOOL_PARSERS`; `hermes` covers Qwen2.5 and
the Hermes models: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass

from modelyard.chat.text import partial_suffix


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str
    """The arguments as a JSON text (what OpenAI's API sends)."""


class ToolCallParser(ABC):
    """Splits one choice's text into content and tool calls, incrementally."""

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """Add generated text; return content safe to send and calls completed by it."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """At the end of generation: whatever is left."""


class TaggedJsonToolParser(ToolCallParser):
    """Calls are JSON objects {"name", "arguments"} between an opening and a closing tag.

    Small models sometimes write a call as bare JSON (or in a json code fence) without the
    tags. An answer that starts that way is held back, and if it turns out to be exactly
    one call of a declared function, it is read as that call; otherwise it is content.
    """

    open_tag = "<tool_call>"
    close_tag = "</tool_call>"

    def __init__(self, function_names: frozenset[str] = frozenset()) -> None:
        self._buffer = ""
        self._in_call = False
        self.calls_seen = 0
        self._function_names = function_names
        self._bare: str | None = "" if function_names else None
        """The answer so far while it may be a bare JSON call; None once it cannot be."""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        if self._bare is not None:
            self._bare += text
            head = self._bare.lstrip()
            if not head or (head.startswith(("{", "```"))
                            and self.open_tag not in head) or "```".startswith(head):
                return "", []
            text, self._bare = self._bare, None
        self._buffer += text
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(self.open_tag)
                if start < 0:
                    keep = partial_suffix(self._buffer, self.open_tag)
                    cut = len(self._buffer) - keep
                    content.append(self._buffer[:cut])
                    self._buffer = self._buffer[cut:]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(self.open_tag):]
                self._in_call = True
            end = self._buffer.find(self.close_tag)
            if end < 0:
                break
            call = self._parse(self._buffer[:end])
            self._buffer = self._buffer[end + len(self.close_tag):]
            self._in_call = False
            if call is not None:
                calls.append(call)
        return self._content("".join(content)), calls

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        if self._bare is not None:
            bare, self._bare = self._bare, None
            call = self._parse(_unfenced(bare))
            if call is not None and call.name in self._function_names:
                return "", [call]
            self.calls_seen = 0
            return bare, []
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            call = self._parse(rest)
            return ("", [call]) if call is not None else (self.open_tag + rest, [])
        return self._content(rest), []

    def _content(self, text: str) -> str:
        # Between and after calls the model writes only newlines; they are not content.
        return "" if self.calls_seen and not text.strip() else text

    def _parse(self, body: str) -> ParsedToolCall | None:
        try:
            data = json.loads(body.strip())
        except json.JSONDecodeError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        self.calls_seen += 1
        return ParsedToolCall(data["name"], json.dumps(arguments, ensure_ascii=False))



def _unfenced(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.removesuffix("```").strip()
    return text


TOOL_PARSERS: dict[str, type[TaggedJsonToolParser]] = {"hermes": TaggedJsonToolParser}


def tool_family(chat_template: str) -> str | None:
    """The tool-call family a chat template writes, or None if it knows no tools."""
    if "<tool_call>" in chat_template:
        return "hermes"
    return None
