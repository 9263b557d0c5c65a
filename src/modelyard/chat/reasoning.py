"""Reasoning blocks: models that think between tags before they answer.

`ReasoningSplitter` separates one choice's streamed text into reasoning and answer. It
starts inside the block when the chat template opened it (the prompt ends with the opening
tag), and it never splits a tag across its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.chat.text import partial_suffix


@dataclass(frozen=True)
class ThinkTags:
    open: str = "<think>"
    close: str = "</think>"


# reasoning_effort -> thinking budget in tokens (None: thinking off).
EFFORT_BUDGETS: dict[str, int | None] = {
    "none": None, "minimal": None, "low": 512, "medium": 2048, "high": 8192,
}


def reasoning_tags(chat_template: str) -> ThinkTags | None:
    """The reasoning tags a chat template uses, or None for a model that does not think."""
    tags = ThinkTags()
    return tags if tags.open in chat_template and tags.close in chat_template else None


class ReasoningSplitter:
    def __init__(self, tags: ThinkTags, *, inside: bool) -> None:
        self.tags = tags
        self.inside = inside
        self._seen_block = inside
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Return (answer, reasoning) safe to send."""
        self._held += text
        answer: list[str] = []
        reasoning: list[str] = []
        while self._held:
            if self.inside:
                end = self._held.find(self.tags.close)
                if end < 0:
                    cut = len(self._held) - partial_suffix(self._held, self.tags.close)
                    reasoning.append(self._held[:cut])
                    self._held = self._held[cut:]
                    break
                reasoning.append(self._held[:end])
                self._held = self._held[end + len(self.tags.close):].lstrip("\n")
                self.inside = False
            elif not self._seen_block:
                start = self._held.find(self.tags.open)
                if start < 0:
                    cut = len(self._held) - partial_suffix(self._held, self.tags.open)
                    answer.append(self._held[:cut])
                    self._held = self._held[cut:]
                    break
                answer.append(self._held[:start])
                self._held = self._held[start + len(self.tags.open):]
                self.inside = self._seen_block = True
            else:
                answer.append(self._held)
                self._held = ""
        return "".join(answer), "".join(reasoning)

    def finish(self) -> tuple[str, str]:
        rest, self._held = self._held, ""
        return ("", rest) if self.inside else (rest, "")
