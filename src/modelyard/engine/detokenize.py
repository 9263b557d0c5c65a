"""Incremental detokenization that never splits a UTF-8 character, and stop-string search."""

from __future__ import annotations

import codecs
from collections.abc import Callable

from modelyard.chat.text import partial_suffix


class IncrementalDetokenizer:
    """Turns token ids into text a token at a time.

    Byte-level tokenizers may cut a multi-byte character across tokens; the incremental
    UTF-8 decoder holds such bytes back until the character is complete.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopStringMatcher:
    """Finds stop strings in streamed text, even when they straddle token boundaries.

    Text that could still turn out to be the start of a stop string is held back until
    it is known not to be; the stop string itself is never released.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.matched: str | None = None
        """The stop string found, once one is."""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        self._held += text
        found = [(at, len(stop), stop) for stop in self._stops
                 if (at := self._held.find(stop)) >= 0]
        if found:
            first, _, self.matched = min(found)  # earliest, then shortest
            released, self._held = self._held[:first], ""
            return released, True
        keep = max(partial_suffix(self._held, stop) for stop in self._stops)
        cut = len(self._held) - keep
        released, self._held = self._held[:cut], self._held[cut:]
        return released, False

    def flush(self) -> str:
        """At the end of generation, the held text was not a stop string after all."""
        released, self._held = self._held, ""
        return released
