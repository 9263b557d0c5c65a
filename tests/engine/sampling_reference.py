"""A plain numpy reference for the token sampler, for the sampling tests.

Everything here is written from the definitions in sampling.py's module docstring, in
float64, with loops where a loop is the clearest statement; none of it calls
modelyard.engine.sampling. The tests compare the implementation against these.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import cast

import numpy as np
import numpy.typing as npt

from modelyard.engine.sampling import Sampler
from modelyard.engine.sequence import SamplingParams

F64 = npt.NDArray[np.float64]
GAP = 30.0
"""Tokens more than this many nats (after temperature) below the best are never drawn."""


# -- the steps -----------------------------------------------------------------------------


def ref_log_softmax(x: npt.ArrayLike) -> F64:
    v = np.asarray(x, dtype=np.float64)
    m = float(v.max())
    return v - m - math.log(float(np.sum(np.exp(v - m))))


def ref_softmax(x: npt.ArrayLike, temperature: float = 1.0) -> F64:
    v = np.asarray(x, dtype=np.float64) / temperature
    e = np.exp(v - v.max())
    return e / e.sum()


def ref_top_k_values(values: npt.ArrayLike, k: int) -> F64:
    """The k largest values, largest first (all of them when k is 0 or covers them)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return ordered if k <= 0 else ordered[:k]


def ref_nucleus(probs: F64, top_p: float) -> list[int]:
    """The smallest most-likely set whose probability reaches top_p (ties by index)."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    total = 0.0
    for size, i in enumerate(order, start=1):
        total += probs[i]
        if total >= top_p:
            return order[:size]
    return order


def ref_min_p(probs: F64, min_p: float) -> list[int]:
    best = max(probs)
    return [i for i, p in enumerate(probs) if p >= min_p * best]


def ref_repetition_penalty(logits: npt.ArrayLike, ids: Iterable[int], penalty: float) -> F64:
    """Each distinct id once: a positive logit divided by the penalty, a negative multiplied."""
    x = np.array(logits, dtype=np.float64)
    for i in set(ids):
        x[i] = x[i] / penalty if x[i] > 0 else x[i] * penalty
    return x


def ref_frequency_presence(logits: npt.ArrayLike, counts: dict[int, int], frequency: float,
                           presence: float) -> F64:
    """OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty."""
    x = np.array(logits, dtype=np.float64)
    for i, c in counts.items():
        x[i] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return x


def ref_logit_bias(logits: npt.ArrayLike, bias: dict[int, float]) -> F64:
    x = np.array(logits, dtype=np.float64)
    for i, b in bias.items():
        x[i] += b
    return x


# -- the pipeline ----------------------------------------------------------------------------


def ref_adjusted(logits: npt.ArrayLike, params: SamplingParams, prompt_ids: list[int],
                 output_ids: list[int]) -> F64:
    """Steps 1-3: bias, repetition penalty on prompt + output, frequency/presence on output."""
    x = ref_logit_bias(logits, params.logit_bias)
    x = ref_repetition_penalty(x, [*prompt_ids, *output_ids], params.repetition_penalty)
    return ref_frequency_presence(x, dict(Counter(output_ids)), params.frequency_penalty,
                                  params.presence_penalty)


def ref_distribution(adjusted: F64, params: SamplingParams) -> F64:
    """Steps 5-6 on the whole vocabulary, no cutoff: what a draw at temperature > 0 uses."""
    probs = ref_softmax(adjusted, params.temperature)
    n = len(probs)
    if 0 < params.top_k < n:
        order = sorted(range(n), key=lambda i: (-adjusted[i], i))
        probs[order[params.top_k:]] = 0.0
        probs /= probs.sum()
    if params.top_p < 1.0:
        keep = ref_nucleus(probs, params.top_p)
        probs = np.where(np.isin(np.arange(n), keep), probs, 0.0)
        probs /= probs.sum()
    if params.min_p > 0.0:
        keep = ref_min_p(probs, params.min_p)
        probs = np.where(np.isin(np.arange(n), keep), probs, 0.0)
        probs /= probs.sum()
    return probs


def within_gap(adjusted: F64, temperature: float) -> npt.NDArray[np.bool_]:
    scaled = adjusted / temperature
    return cast(npt.NDArray[np.bool_], scaled >= scaled.max() - GAP)


def restricted(probs: F64, mask: npt.NDArray[np.bool_]) -> F64:
    """`probs` on `mask` only, renormalised."""
    kept = np.where(mask, probs, 0.0)
    return kept / kept.sum()


def close_call(adjusted: F64, params: SamplingParams, tol: float = 2e-4) -> bool:
    """Whether a cut (gap, top_k, top_p, min_p) falls so near a boundary that float32 vs
    float64 rounding could decide it; the exact comparisons are skipped then."""
    t = params.temperature
    if np.any(np.abs(adjusted - (adjusted.max() - GAP * t)) < 1e-3):
        return True
    ordered = np.sort(adjusted)[::-1]
    k = params.top_k
    if 0 < k < len(ordered) and ordered[k - 1] - ordered[k] < tol:
        return True
    probs = ref_softmax(adjusted, t)
    if 0 < k < len(probs):
        probs = np.where(adjusted >= ordered[k - 1], probs, 0.0)
        probs /= probs.sum()
    if params.top_p < 1.0:
        cumulative = np.cumsum(np.sort(probs)[::-1])
        if np.any(np.abs(cumulative - params.top_p) < tol):
            return True
        probs = np.where(np.isin(np.arange(len(probs)), ref_nucleus(probs, params.top_p)),
                         probs, 0.0)
        probs /= probs.sum()
    if params.min_p > 0.0:
        ratios = probs[probs > 0] / probs.max()
        if np.any(np.abs(ratios - params.min_p) < tol * params.min_p):
            return True
    return False


# -- reading the implementation's distribution -------------------------------------------------


class FixedUniform:
    """Stands in for the sampler's np.random.Generator: `random()` returns `u`.

    The sampler draws by inverting its cumulative distribution at one uniform number, so
    the token it returns as a function of `u` tells each token's exact probability: the
    length of the `u` interval that gives it.
    """

    def __init__(self) -> None:
        self.u = 0.0
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.u


def implementation_distribution(logits: npt.NDArray[np.float32], params: SamplingParams,
                                prompt_ids: list[int], output_ids: list[int]) -> F64:
    """The probability of each token under the implementation, found by bisecting for the
    `u` boundaries to the last bit (so even a token e^-30 below the best shows up)."""
    uniform = FixedUniform()
    stateless = not (params.repetition_penalty != 1.0 or params.frequency_penalty
                     or params.presence_penalty)
    shared = Sampler(params, prompt_ids, cast(np.random.Generator, uniform))
    for token in output_ids:
        shared.accept(token)

    def token_at(u: float) -> int:
        sampler = shared
        if not stateless:  # sample() records its token for the penalties: start afresh
            sampler = Sampler(params, prompt_ids, cast(np.random.Generator, uniform))
            for token in output_ids:
                sampler.accept(token)
        uniform.u, calls = u, uniform.calls
        token = sampler.sample(logits).token
        assert uniform.calls == calls + 1, "one uniform number per draw"
        return token

    probs = np.zeros(len(logits))
    last = float(np.nextafter(1.0, 0.0))
    lo, token = 0.0, token_at(0.0)
    while token_at(last) != token:
        a, b = lo, last  # token_at(a) == token != token_at(b)
        while (mid := (a + b) / 2) not in (a, b):
            if token_at(mid) == token:
                a = mid
            else:
                b = mid
        probs[token] += b - lo
        lo, token = b, token_at(b)
    probs[token] += 1.0 - lo
    return probs


# -- chi-square ------------------------------------------------------------------------------


def chi_square_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with an integer `df`, in closed form."""
    if df % 2 == 0:
        term = total = math.exp(-x / 2)
        for i in range(1, df // 2):
            term *= x / 2 / i
            total += term
        return total
    total = math.erfc(math.sqrt(x / 2))
    term = math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
    for i in range(1, (df - 1) // 2 + 1):
        total += term
        term *= x / (2 * i + 1)
    return total


def chi_square_p_value(counts: npt.ArrayLike, probs: F64, min_expected: float = 5.0) -> float:
    """Pearson's goodness of fit of `counts` to `probs` (the tokens `probs` gives zero are
    left out: the caller checks they were never drawn). Bins expecting fewer than
    `min_expected` draws are pooled, as the chi-square approximation needs."""
    observed = np.asarray(counts, dtype=np.float64)
    support = probs > 0
    observed, expected = observed[support], probs[support] * observed[support].sum()
    order = np.argsort(expected)
    observed, expected = observed[order], expected[order]
    small = int(np.searchsorted(expected, min_expected))
    if small:
        observed = np.concatenate([[observed[:small].sum()], observed[small:]])
        expected = np.concatenate([[expected[:small].sum()], expected[small:]])
        if expected[0] < min_expected and len(expected) > 1:
            observed = np.concatenate([[observed[0] + observed[1]], observed[2:]])
            expected = np.concatenate([[expected[0] + expected[1]], expected[2:]])
    if len(expected) < 2:
        return 1.0
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return chi_square_sf(statistic, len(expected) - 1)
