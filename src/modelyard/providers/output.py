"""Turn one choice's generated text into what the API sends: answer, reasoning, tool calls."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from modelyard.chat.reasoning import ReasoningSplitter, ThinkTags
from modelyard.chat.tool_parsers import ToolCallParser
from modelyard.providers.base import ToolCallDelta


@dataclass(frozen=True)
class ChoiceText:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


class ChoiceOutput:
    """Splits a choice's stream: reasoning first (if the model thinks and the request wants
    it separate), then tool calls out of the answer (if the request declared tools)."""

    def __init__(self, *, reasoning: ThinkTags | None, starts_inside_reasoning: bool,
                 separate_reasoning: bool, tool_parser: ToolCallParser | None) -> None:
        self._splitter = (ReasoningSplitter(reasoning, inside=starts_inside_reasoning)
                          if reasoning is not None and separate_reasoning else None)
        # Inline reasoning keeps its tags; one the template opened is opened in the text too.
        self._prefix = (reasoning.open if reasoning is not None and not separate_reasoning
                        and starts_inside_reasoning else "")
        self._tools = tool_parser
        self.num_tool_calls = 0

    def feed(self, text: str, *, final: bool = False) -> ChoiceText:
        text, self._prefix = self._prefix + text, ""
        reasoning = ""
        if self._splitter is not None:
            text, reasoning = self._splitter.feed(text)
            if final:
                answer, thought = self._splitter.finish()
                text, reasoning = text + answer, reasoning + thought
        calls: list[ToolCallDelta] = []
        if self._tools is not None:
            text, parsed = self._tools.feed(text)
            if final:
                tail, more = self._tools.finish()
                text, parsed = text + tail, parsed + more
            for call in parsed:
                calls.append(ToolCallDelta(self.num_tool_calls, f"call_{uuid.uuid4().hex[:24]}",
                                           call.name, call.arguments))
                self.num_tool_calls += 1
        return ChoiceText(text, reasoning, tuple(calls))
