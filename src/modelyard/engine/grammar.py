"""Constrained decoding with llguidance: grammars, and per-sequence token masks.

llguidance builds its tokenizer from the llama.cpp vocabulary (the runner hands it over)
and computes, for each step, the set of tokens that keep the output inside the grammar.
The engine turns that set into a mask on the logits before sampling. llguidance was
measured against xgrammar and llama.cpp's GBNF sampler (benchmarks/bench_grammar.py).

A `Constraint` is an llguidance grammar, optionally lazy: it starts only once the model
samples its trigger token (a tool call opened under `tool_choice: "auto"`).
"""

from __future__ import annotations

import json
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import numpy.typing as npt

from modelyard.errors import ModelyardError


class GrammarError(ModelyardError, ValueError):
    """The constraint cannot be enforced; the message names what is unsupported."""


@dataclass(frozen=True)
class Constraint:
    grammar: str
    trigger_token: int | None = None
    """None: the grammar applies from the first token. Else it starts after this token."""
    stop_after: bool = False
    """End the sequence when the grammar completes. Otherwise a lazy grammar re-arms: it
    waits for its trigger again (several tool calls in one turn)."""
    compiled: llguidance.LLMatcher | None = field(default=None, compare=False, repr=False)
    """The grammar compiled when the constraint was made (off the event loop); each
    choice's matcher is a copy of it, never this one."""


class GrammarCompiler:
    """Compiles response formats and tool-call shapes for one model's vocabulary."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, n_vocab: int) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = n_vocab

    def _checked(self, grammar: str) -> str:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer)
        if is_error:
            raise GrammarError(messages[0] if messages else "the grammar is invalid")
        return grammar

    def json_schema(self, schema: dict[str, Any], *, strict: bool) -> Constraint:
        """Output valid against `schema`. Strict: an unsupported keyword is an error naming
        it; otherwise unsupported keywords are ignored (llguidance's lenient mode)."""
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"lenient": not strict, "whitespace_flexible": False})
        if strict:
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer)
            problems = messages if (is_error or messages) else []
            if problems:
                raise GrammarError(problems[0])
            return Constraint(grammar, stop_after=True, compiled=self._compile(grammar))
        grammar = self._checked(grammar)
        return Constraint(grammar, stop_after=True, compiled=self._compile(grammar))

    def json_object(self) -> Constraint:
        return self.json_schema({"type": "object"}, strict=False)

    def lark(self, lark: str, *, trigger_token: int | None = None,
             stop_after: bool = True) -> Constraint:
        grammar = self._checked(llguidance.LLMatcher.grammar_from_lark(lark))
        return Constraint(grammar, trigger_token, stop_after, self._compile(grammar))

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, grammar)

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        return self.matchers(constraint, 1)[0]

    def matchers(self, constraint: Constraint, n: int) -> list[GrammarMatcher]:
        """`n` matchers at the grammar's start (one per choice of a request), copies of
        the grammar the constraint compiled: no compiling here, nor once per choice."""
        template = constraint.compiled or self._compile(constraint.grammar)
        return [GrammarMatcher(template.deep_copy(), constraint, self.n_vocab,
                               self.tokenizer.vocab_size) for _ in range(n)]


def json_schema_lark(schema: dict[str, Any]) -> str:
    """A JSON schema embedded in a Lark grammar (llguidance's %json extension)."""
    return "%json " + json.dumps(schema)


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, constraint: Constraint, n_vocab: int,
                 grammar_vocab: int) -> None:
        self._matcher = matcher
        self.constraint = constraint
        self.active = constraint.trigger_token is None
        self._n_vocab = n_vocab
        self._bitmask = llg_numpy.allocate_token_bitmask(1, grammar_vocab)
        self._pending: Future[npt.NDArray[np.bool_]] | None = None

    def prefetch(self, pool: Executor) -> None:
        """Start computing the next mask now, so it overlaps the next decode step."""
        if self.active and self._pending is None and not self._matcher.is_stopped():
            self._pending = pool.submit(self._compute)

    def allowed(self) -> npt.NDArray[np.bool_]:
        """Which tokens may come next."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending.result()
        return self._compute()

    def _compute(self) -> npt.NDArray[np.bool_]:
        # llguidance releases the GIL while it computes the mask.
        llg_numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")
        allowed = np.zeros(self._n_vocab, dtype=np.bool_)
        n = min(self._n_vocab, bits.shape[0])
        allowed[:n] = bits[:n].astype(np.bool_)
        return allowed

    def consume(self, token: int) -> None:
        """Advance past a sampled token; a lazy grammar starts after its trigger. Call it
        only after `allowed()` (never with a mask still being computed)."""
        if not self.active:
            self.active = token == self.constraint.trigger_token
            return
        self._matcher.consume_token(token)
        if (self._matcher.is_stopped() and self.constraint.trigger_token is not None
                and not self.constraint.stop_after):
            self._matcher.reset()
            self.active = False

    @property
    def done(self) -> bool:
        """The grammar is complete and the sequence should end here."""
        return self.active and self.constraint.stop_after and self._matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None
