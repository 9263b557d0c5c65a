"""Token sampling on one sequence's logits, in numpy.

Each sequence owns a `Sampler` with its own random generator and penalty state, so
sequences decoded in the same batch never share randomness, and a `seed` makes a
sequence reproducible. llama.cpp's sampler chain is not used: its penalties work on the
last N tokens only and its repetition penalty does not reach the prompt, which is not what
SPEC.md asks; every step below is written from its definition instead.

The steps, in order:

1. `logit_bias`: added to the logits (OpenAI; +-100 forces or bans a token).
2. `repetition_penalty` on every token of the prompt and the output (a positive logit is
   divided by it, a negative one multiplied: the CTRL / Hugging Face / vLLM definition).
3. `frequency_penalty` and `presence_penalty` on the output tokens (OpenAI:
   logit -= count * frequency + (count > 0) * presence).
4. logprobs, when asked, are read here: the log-softmax of these logits, that is after
   bias and penalties but before temperature and truncation (as OpenAI reports them).
5. temperature 0: greedy (argmax), no randomness. Otherwise divide by the temperature.
6. `top_k`, then `top_p` (smallest most-likely set reaching top_p), then `min_p` (drop
   tokens below min_p x the top token's probability), renormalising after each.
7. draw from what is left, walking the candidates in token id order (never in an order
   that follows their values, which a tiny change in the logits could shuffle).

Tokens whose probability is below e^-30 (about 1e-13) of the most likely token's are
never drawn (their total mass is at most the vocabulary size x e^-30: about 1.4e-8 for a
152k vocabulary). With `top_k` set, the k best logits are picked from the raw row first,
so every later step works on k candidates instead of the whole vocabulary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelyard.engine.sequence import SamplingParams

GREEDY_EPSILON = 1e-5
SEED_MODULUS = 2**64
"""API seeds are any 64-bit integer, negative ones included; numpy takes them modulo this."""
NEGLIGIBLE_LOGIT_GAP = 30.0
_FIRST_TOP_P_CANDIDATES = 64

Logits = npt.NDArray[np.float32]
Ids = npt.NDArray[np.intp]


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: TokenLogprob | None = None


# -- the steps, each a plain function ----------------------------------------------------------


def softmax(logits: Logits, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    weights = np.exp(scaled)
    result: npt.NDArray[np.float64] = weights / weights.sum()
    return result


def log_softmax(logits: Logits) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - float(logits.max())
    result: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum())
    return result


def apply_repetition_penalty(logits: Logits, token_ids: Ids, penalty: float) -> None:
    """In place: divide positive logits of `token_ids` by `penalty`, multiply negative ones."""
    values = logits[token_ids]
    logits[token_ids] = np.where(values > 0, values / penalty, values * penalty)


def apply_frequency_presence(logits: Logits, token_ids: Ids, counts: npt.NDArray[np.float32],
                             frequency: float, presence: float) -> None:
    """In place, OpenAI's definition: logit -= count * frequency + (count > 0) * presence."""
    logits[token_ids] -= counts * frequency + (counts > 0) * presence


def top_k_indices(values: npt.NDArray[np.float64], k: int) -> Ids:
    """Indices of the k largest values (all of them when k is 0 or covers them)."""
    if k <= 0 or k >= values.shape[0]:
        return np.arange(values.shape[0])
    result: Ids = np.argpartition(-values, k - 1)[:k]
    return result


def nucleus(probs: npt.NDArray[np.float64], top_p: float) -> Ids:
    """Indices of the smallest most-likely set whose total probability is >= top_p.

    Sorting everything is the expensive part, so look at the top candidates first and
    widen only if they do not reach top_p.
    """
    n = probs.shape[0]
    k = min(_FIRST_TOP_P_CANDIDATES, n)
    while True:
        if k >= n:
            candidates = np.argsort(-probs, kind="stable")
        else:
            top = np.argpartition(-probs, k - 1)[:k]
            candidates = top[np.argsort(-probs[top], kind="stable")]
        cumulative = np.cumsum(probs[candidates])
        if cumulative[-1] >= top_p or k >= n:
            keep = int(np.searchsorted(cumulative, top_p * (1 - 1e-12))) + 1
            result: Ids = candidates[: min(keep, len(candidates))]
            return result
        k = min(k * 8, n)


def min_p_indices(probs: npt.NDArray[np.float64], min_p: float) -> Ids:
    """Indices of the tokens whose probability is at least min_p x the largest."""
    result: Ids = np.flatnonzero(probs >= min_p * probs.max())
    return result


def top_logprobs(logprobs: npt.NDArray[np.float64], k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely tokens, best first; tokens a grammar excludes (-inf) are left out."""
    ids = top_k_indices(logprobs, k)
    ids = ids[np.argsort(-logprobs[ids], kind="stable")]
    return tuple((int(i), float(logprobs[i])) for i in ids if np.isfinite(logprobs[i]))


# -- seeds ----------------------------------------------------------------------------------------


def seeded_rng(seed: int | None) -> np.random.Generator:
    """A random generator for an API seed (None: fresh entropy); every int is accepted."""
    return np.random.default_rng(None if seed is None else seed % SEED_MODULUS)


def choice_rngs(seed: int | None, n: int) -> list[np.random.Generator]:
    """One generator per choice of a request: with a seed and n > 1, independent streams
    derived from it, so every choice is reproducible and no two are alike."""
    if seed is not None and n > 1:
        streams = np.random.SeedSequence(seed % SEED_MODULUS).spawn(n)
        return [np.random.default_rng(stream) for stream in streams]
    return [seeded_rng(seed) for _ in range(n)]


# -- the per-sequence sampler ------------------------------------------------------------------


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int] | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.params = params
        self.greedy = params.temperature < GREEDY_EPSILON
        self._rng = rng if rng is not None else seeded_rng(params.seed)
        bias = params.logit_bias
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.intp, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        self._output_counts: Counter[int] = Counter()
        self._seen = set(prompt_ids or ()) if params.repetition_penalty != 1.0 else set()
        self._seen_ids: Ids | None = None
        self._count_arrays: tuple[Ids, npt.NDArray[np.float32]] | None = None

    @property
    def _modifies_logits(self) -> bool:
        p = self.params
        return bool(len(self._bias_ids) or p.repetition_penalty != 1.0 or (
            self._output_counts and (p.frequency_penalty or p.presence_penalty)))

    def accept(self, token: int) -> None:
        """Record a generated token (for the penalties)."""
        p = self.params
        if p.frequency_penalty or p.presence_penalty:
            self._output_counts[token] += 1
            self._count_arrays = None
        if p.repetition_penalty != 1.0 and token not in self._seen:
            self._seen.add(token)
            self._seen_ids = None

    def adjusted(self, logits: Logits) -> Logits:
        """Steps 1-3: the logits after bias and penalties (a copy when anything changes)."""
        if not self._modifies_logits:
            return logits
        x = np.array(logits, dtype=np.float32)
        p = self.params
        if len(self._bias_ids):
            x[self._bias_ids] += self._bias_values
        if p.repetition_penalty != 1.0 and self._seen:
            if self._seen_ids is None:
                self._seen_ids = np.fromiter(self._seen, dtype=np.intp, count=len(self._seen))
            apply_repetition_penalty(x, self._seen_ids, p.repetition_penalty)
        if self._output_counts and (p.frequency_penalty or p.presence_penalty):
            if self._count_arrays is None:
                items = self._output_counts.items()
                self._count_arrays = (
                    np.fromiter((t for t, _ in items), dtype=np.intp, count=len(items)),
                    np.fromiter((c for _, c in items), dtype=np.float32, count=len(items)))
            ids, counts = self._count_arrays
            apply_frequency_presence(x, ids, counts, p.frequency_penalty, p.presence_penalty)
        return x

    def sample(self, logits: Logits, allowed: npt.NDArray[np.bool_] | None = None) -> Sample:
        """Draw the next token; `allowed` (a grammar's mask) excludes every other token
        before anything else, so logprobs are those of the constrained distribution."""
        x = self.adjusted(logits)
        if allowed is not None:
            x = np.where(allowed, x, np.float32(-np.inf)).astype(np.float32)
        token = int(np.argmax(x)) if self.greedy else self._draw(x)
        logprob = None
        if self.params.logprobs:
            full = log_softmax(x)
            logprob = TokenLogprob(float(full[token]),
                                   top_logprobs(full, self.params.top_logprobs)
                                   if self.params.top_logprobs else ())
        self.accept(token)
        return Sample(token, logprob)

    def _draw(self, x: Logits) -> int:
        p = self.params
        # top_k first, on the raw logits: the k largest logits are the k most likely tokens
        # at any temperature, and every later step then works on k candidates.
        top: Ids | None = None
        row = x
        if 0 < p.top_k < x.shape[0]:
            # In token id order: argpartition's order follows the values, and a tiny change
            # in the logits must not reorder the candidates the draw walks through.
            top = np.sort(np.argpartition(x, -p.top_k)[-p.top_k:])
            row = x[top]
        # Then every token within NEGLIGIBLE_LOGIT_GAP (after temperature) of the best.
        near = np.flatnonzero(row >= float(row.max()) - NEGLIGIBLE_LOGIT_GAP * p.temperature)
        candidates = top[near] if top is not None else near
        values = row[near].astype(np.float64) / p.temperature
        values -= values.max()
        probs = np.exp(values)
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = np.sort(nucleus(probs, p.top_p))  # token id order, as above
            candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
        if p.min_p > 0.0:
            keep = min_p_indices(probs, p.min_p)
            candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1],
                                    side="right"))
        return int(candidates[min(index, len(candidates) - 1)])
