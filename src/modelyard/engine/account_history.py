"""Draft tokens from an account's own recent outputs.

Agents and pipelines ask one account's model for the same shapes again and again: a retried
request, the same tool call with other arguments, a report in a fixed form. What such an
answer repeats is often in none of its own prompt, but in the account's earlier answers
(the observation behind SuffixDecoding, arXiv 2411.04975). `OutputHistory` keeps one
account's recent outputs and an index of their n-grams; a sequence whose own text has no
match as long as `ngram` (speculation.py) drafts what followed the latest earlier
occurrence of its last `ngram` tokens in them. The drafts are verified like any other, so
they change no output; they only cost a step's tokens when they fail.

Never across accounts: each account has a store of its own (`AccountHistories`, one per
engine, so one per model: token ids mean nothing to another model), a request of no
account (the common share) has none, and outputs are recorded only when they end whole.
An n-gram index stands in for SuffixDecoding's suffix tree: a dictionary write per token
to add, one read to look up, and the same latest-occurrence answer for the suffix lengths
used here.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass


@dataclass(frozen=True)
class HistoryConfig:
    ngram: int = 4
    """Tokens of the sequence's end that must match an earlier output's (longer than the
    shortest prompt-lookup match: another answer's text predicts less than one's own)."""
    max_tokens: int = 4096
    """Output tokens kept per account, the newest first; older outputs are dropped whole
    (about 2 MB with the index at most)."""
    max_accounts: int = 64
    """Accounts kept per engine, the one used least recently dropped first: at most about
    128 MB per model in all."""


class OutputHistory:
    """One account's recent outputs and the n-gram index over them (engine thread only)."""

    def __init__(self, config: HistoryConfig) -> None:
        self.config = config
        self._texts: dict[int, list[int]] = {}
        """Kept outputs by serial, oldest first (a dict keeps insertion order)."""
        self._index: dict[tuple[int, ...], tuple[int, int]] = {}
        """n-gram -> (output serial, position after its latest occurrence in that output)."""
        self._serials = itertools.count()
        self.num_tokens = 0

    def add(self, tokens: Seq[int]) -> None:
        """Keep a finished output (a copy), dropping the oldest past `max_tokens`."""
        n = self.config.ngram
        if len(tokens) <= n:
            return
        text = list(tokens[-self.config.max_tokens:])
        serial = next(self._serials)
        self._texts[serial] = text
        self.num_tokens += len(text)
        for end in range(n, len(text)):
            self._index[tuple(text[end - n:end])] = (serial, end)
        while self.num_tokens > self.config.max_tokens:
            self.num_tokens -= len(self._texts.pop(next(iter(self._texts))))
        if len(self._index) > 2 * self.config.max_tokens:
            self._reindex()

    def _reindex(self) -> None:
        """Drop the index entries of outputs no longer kept."""
        self._index = {gram: hit for gram, hit in self._index.items() if hit[0] in self._texts}

    def propose(self, tokens: Seq[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest occurrence of the last `ngram` of
        `tokens` in a kept output; [] when there is none."""
        n = self.config.ngram
        if limit <= 0 or len(tokens) < n:
            return []
        hit = self._index.get(tuple(tokens[-n:]))
        if hit is None:
            return []
        serial, at = hit
        text = self._texts.get(serial)
        return [] if text is None else text[at:at + limit]


class AccountHistories:
    """Each account's `OutputHistory` for one engine. `for_account` may be called from any
    thread (a request's submit); the histories themselves are used on the engine thread."""

    def __init__(self, config: HistoryConfig | None = None) -> None:
        self.config = config or HistoryConfig()
        self._accounts: OrderedDict[str, OutputHistory] = OrderedDict()
        self._lock = threading.Lock()

    def for_account(self, key: str | None) -> OutputHistory | None:
        """The account's history (made on first use); None for no account."""
        if key is None:
            return None
        with self._lock:
            history = self._accounts.get(key)
            if history is None:
                history = self._accounts[key] = OutputHistory(self.config)
                while len(self._accounts) > self.config.max_accounts:
                    self._accounts.popitem(last=False)
            else:
                self._accounts.move_to_end(key)
            return history

    def __len__(self) -> int:
        return len(self._accounts)
