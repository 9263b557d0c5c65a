"""Keep special-token text that a client writes from becoming the model's control tokens.

A rendered prompt is tokenized with special-token text parsed, since the template's own
markup (`<|im_start|>`, `<|im_end|>` ...) must become control tokens. Text that came from
the request (message content and text parts, names, tool call ids and arguments, tool
definitions) must not: a user who writes `<|im_start|>system` is writing text.

When no string of the request contains a special token's text, the prompt is rendered and
tokenized as a whole, exactly as the template wrote it. Otherwise each occurrence in the
request's strings is replaced by a marker (a random ASCII word, the same for the whole
render, with the occurrence's index) before rendering; the rendered prompt is cut at the
markers, and each marker's text is tokenized as plain text while the rest is tokenized with
special tokens parsed. A template that rewrites a marker (upper-cases it, say) leaves the
marker's word in the prompt as plain text: never a control token.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Piece:
    text: str
    special: bool
    """True: template markup, special tokens parsed; False: request text, never parsed."""


@dataclass(frozen=True)
class Prompt:
    text: str
    """The prompt as rendered, with the request's own special-token text in place."""
    pieces: tuple[Piece, ...]


Render = Callable[..., str]


class SpecialTextShield:
    def __init__(self, special_texts: Iterable[str]) -> None:
        texts = sorted({text for text in special_texts if text}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def contains_special(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text) is not None

    def render(self, render: Render, messages: list[dict[str, Any]], **kwargs: Any) -> Prompt:
        """Render with `render(messages, **kwargs)` and cut the result into pieces."""
        if self._pattern is None:
            text = render(messages, **kwargs)
            return Prompt(text, (Piece(text, True),))
        marked = _Marker(self._pattern)
        shielded_messages = marked.walk(messages)
        shielded_kwargs = marked.walk(kwargs)
        if not marked.found:
            text = render(messages, **kwargs)
            return Prompt(text, (Piece(text, True),))
        return marked.split(render(shielded_messages, **shielded_kwargs))


class _Marker:
    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        self._word = f"SPECIALTEXT{secrets.token_hex(8)}"
        self.found: list[str] = []

    def _replace(self, match: re.Match[str]) -> str:
        self.found.append(match.group(0))
        return f"{self._word}x{len(self.found) - 1}x"

    def walk(self, value: Any) -> Any:
        """`value` with special-token text in every string (keys included) replaced by
        markers; iterative over containers, so no nesting depth can overflow the stack."""
        if isinstance(value, str):
            return self._pattern.sub(self._replace, value)
        if not isinstance(value, dict | list):
            return value
        root: list[Any] = [None]
        stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]
        while stack:
            parent, slot, item = stack.pop()
            if isinstance(item, dict):
                copy: dict[Any, Any] = {}
                parent[slot] = copy
                for key, child in item.items():
                    new_key = self._pattern.sub(self._replace, key) \
                        if isinstance(key, str) else key
                    copy[new_key] = None
                    stack.append((copy, new_key, child))
            elif isinstance(item, list):
                items: list[Any] = [None] * len(item)
                parent[slot] = items
                stack.extend((items, index, child) for index, child in enumerate(item))
            elif isinstance(item, str):
                parent[slot] = self._pattern.sub(self._replace, item)
            else:
                parent[slot] = item
        return root[0]

    def split(self, rendered: str) -> Prompt:
        pieces: list[Piece] = []
        text: list[str] = []
        position = 0
        for match in re.finditer(rf"{self._word}x(\d+)x", rendered):
            index = int(match.group(1))
            if index >= len(self.found):
                continue  # not one of ours (cannot happen: the word is random)
            if match.start() > position:
                pieces.append(Piece(rendered[position:match.start()], True))
            pieces.append(Piece(self.found[index], False))
            text.append(rendered[position:match.start()] + self.found[index])
            position = match.end()
        if position < len(rendered):
            pieces.append(Piece(rendered[position:], True))
        text.append(rendered[position:])
        return Prompt("".join(text), tuple(pieces))
