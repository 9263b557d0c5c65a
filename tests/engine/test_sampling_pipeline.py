"""The whole sampling pipeline against the reference: the exact distribution the
implementation draws from, and seeded draws checked with a chi-square test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from modelyard.engine.sampling import Sampler
from modelyard.engine.sequence import SamplingParams
from tests.engine.sampling_reference import (
    F64,
    GAP,
    chi_square_p_value,
    chi_square_sf,
    close_call,
    implementation_distribution,
    ref_adjusted,
    ref_distribution,
    restricted,
    within_gap,
)

T = TypeVar("T")

P_VALUE = 1e-6
"""Draws fail the chi-square test below this p-value (the seeds make it deterministic)."""
RTOL, ATOL = 2e-4, 1e-15
"""The implementation adjusts logits in float32, the reference in float64."""


@dataclass(frozen=True)
class Case:
    logits: npt.NDArray[np.float32]
    params: SamplingParams
    prompt: list[int]
    outputs: list[int]

    def adjusted(self) -> F64:
        return ref_adjusted(self.logits, self.params, self.prompt, self.outputs)

    def expected(self) -> F64:
        """The reference's distribution, restricted to the tokens within the gap."""
        adjusted = self.adjusted()
        return restricted(ref_distribution(adjusted, self.params),
                          within_gap(adjusted, self.params.temperature))

    def draws(self, n: int) -> npt.NDArray[np.float64]:
        """How often each token comes out of `n` seeded draws, each from the same state."""
        rng = np.random.default_rng(self.params.seed)
        counts = np.zeros(len(self.logits))
        for _ in range(n):
            sampler = Sampler(self.params, self.prompt, rng)
            for token in self.outputs:
                sampler.accept(token)
            counts[sampler.sample(self.logits).token] += 1
        return counts


@st.composite
def cases(draw: st.DrawFn, penalties: bool = True) -> Case:
    """Random small vocabularies and parameters; `penalties` adds logit_bias and penalties."""
    n = draw(st.integers(5, 50))
    seed = draw(st.integers(0, 2**32 - 1))
    temperature = draw(st.floats(0.25, 3.0))
    # logits spread over up to 50 nats after temperature: the 30-nat cutoff matters or not
    spread = temperature * draw(st.floats(0.5, 25.0))
    logits = np.random.default_rng(seed).uniform(-spread, spread, n).astype(np.float32)
    ids = st.integers(0, n - 1)

    def maybe(off: T, values: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
        """`off`, or (with penalties) anything from `values`."""
        return st.one_of(st.just(off), values) if penalties else st.just(off)

    params = SamplingParams(
        temperature=temperature,
        top_k=draw(st.one_of(st.just(0), st.integers(1, n + 1))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.5))),
        repetition_penalty=draw(maybe(1.0, st.floats(0.5, 2.0))),
        frequency_penalty=draw(maybe(0.0, st.floats(-2.0, 2.0))),
        presence_penalty=draw(maybe(0.0, st.floats(-2.0, 2.0))),
        logit_bias=draw(maybe({}, st.dictionaries(ids, st.floats(-5.0, 5.0), max_size=3))),
        seed=seed,
    )
    prompt = draw(st.lists(ids, max_size=8)) if penalties else []
    outputs = draw(st.lists(ids, max_size=8)) if penalties else []
    return Case(logits, params, prompt, outputs)


# -- the exact distribution ------------------------------------------------------------------


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(cases())
def test_the_implementation_draws_from_the_reference_distribution(case: Case) -> None:
    adjusted = case.adjusted()
    assume(not close_call(adjusted, case.params))
    actual = implementation_distribution(case.logits, case.params, case.prompt, case.outputs)
    expected = case.expected()
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
    # the support exactly: nothing beyond the gap or cut by top_k / top_p / min_p, and
    # every other token (even one e^-30 below the best) has its share
    assert np.array_equal(actual > 0, expected > 0)
    assert np.all(actual[~within_gap(adjusted, case.params.temperature)] == 0)
    event(f"the cutoff drops tokens: {not within_gap(adjusted, case.params.temperature).all()}")
    event(f"tokens left: {'one' if (expected > 0).sum() == 1 else 'several'}")


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(5, 50), st.integers(0, 2**32 - 1), st.floats(0.25, 3.0), st.booleans())
def test_tokens_beyond_30_nats_are_never_candidates(
    n: int, seed: int, temperature: float, cutoff_matters: bool
) -> None:
    rng = np.random.default_rng(seed)
    gap = GAP * temperature
    # the best token at 0; the rest within the gap, by at least 0.05 (no close call) ...
    logits = rng.uniform(-(gap - 0.05), 0.0, n)
    logits[0] = 0.0
    far = np.zeros(n, dtype=bool)
    if cutoff_matters:  # ... or some of them beyond it, just (0.05) or far
        far[rng.choice(np.arange(1, n), size=int(rng.integers(1, n)), replace=False)] = True
        logits[far] = -gap - rng.uniform(0.05, 20.0, int(far.sum()))
    logits32 = logits.astype(np.float32)
    params = SamplingParams(temperature=temperature)

    actual = implementation_distribution(logits32, params, [], [])
    everything = ref_distribution(logits32.astype(np.float64), params)
    assert np.all(everything > 0)  # without the cutoff every token could come out
    assert np.all(actual[far] == 0)
    assert np.all(actual[~far] > 0)
    np.testing.assert_allclose(actual, restricted(everything, ~far), rtol=RTOL, atol=ATOL)
    if not cutoff_matters:
        np.testing.assert_allclose(actual, everything, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("temperature", "candidates"), [(1.0, [0, 1]), (2.0, [0, 1, 2])])
def test_the_cutoff_scales_with_temperature(temperature: float, candidates: list[int]) -> None:
    logits = np.array([0.0, -29.0, -31.0], dtype=np.float32)
    actual = implementation_distribution(logits, SamplingParams(temperature=temperature), [], [])
    assert np.flatnonzero(actual).tolist() == candidates


# -- seeded draws --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(cases())
def test_seeded_draws_pass_a_chi_square_test(case: Case) -> None:
    assume(not close_call(case.adjusted(), case.params))
    expected = case.expected()
    counts = case.draws(3000)
    assert counts[expected == 0].sum() == 0, "drew a token the reference never would"
    assert chi_square_p_value(counts, expected) > P_VALUE


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(cases(penalties=False))
def test_one_sampler_drawing_many_times_passes_a_chi_square_test(case: Case) -> None:
    # without penalties the state never changes, so one sampler can draw them all
    assume(not close_call(case.adjusted(), case.params))
    expected = case.expected()
    sampler = Sampler(case.params)
    counts = np.bincount([sampler.sample(case.logits).token for _ in range(3000)],
                         minlength=len(case.logits))
    assert counts[expected == 0].sum() == 0, "drew a token the reference never would"
    assert chi_square_p_value(counts, expected) > P_VALUE


def logits_of(probs: list[float]) -> npt.NDArray[np.float32]:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


@pytest.mark.parametrize(
    ("probs", "params", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.4], SamplingParams(), [0.1, 0.2, 0.3, 0.4]),
        # T = 0.5 squares: 1, 4, 9, 16 over 30
        ([0.1, 0.2, 0.3, 0.4], SamplingParams(temperature=0.5), [1, 4, 9, 16]),
        # top_p 0.75 keeps {0.5, 0.3}, renormalised
        ([0.5, 0.3, 0.15, 0.05], SamplingParams(top_p=0.75), [5, 3, 0, 0]),
        ([0.5, 0.3, 0.15, 0.05], SamplingParams(top_k=3), [50, 30, 15, 0]),
        # min_p 0.29 keeps what is at least 0.145
        ([0.5, 0.3, 0.15, 0.05], SamplingParams(min_p=0.29), [50, 30, 15, 0]),
        ([0.5, 0.3, 0.15, 0.05], SamplingParams(min_p=0.31), [5, 3, 0, 0]),
    ],
)
def test_draws_follow_small_distributions(probs: list[float], params: SamplingParams,
                                          expected: list[float]) -> None:
    case = Case(logits_of(probs), params, [], [])
    weights = np.asarray(expected, dtype=np.float64)
    weights /= weights.sum()
    np.testing.assert_allclose(implementation_distribution(case.logits, params, [], []),
                               weights, rtol=1e-5, atol=ATOL)
    counts = case.draws(8000)
    assert counts[weights == 0].sum() == 0
    assert chi_square_p_value(counts, weights) > P_VALUE


def test_the_chi_square_check_can_fail() -> None:
    # draws at T = 1 are far from the distribution at T = 0.8
    logits = np.random.default_rng(0).normal(size=20).astype(np.float32)
    counts = Case(logits, SamplingParams(seed=3), [], []).draws(3000)
    assert chi_square_p_value(counts, ref_distribution(logits.astype(np.float64),
                                                       SamplingParams(temperature=1.0))) > P_VALUE
    assert chi_square_p_value(counts, ref_distribution(logits.astype(np.float64),
                                                       SamplingParams(temperature=0.8))) < P_VALUE


@pytest.mark.parametrize(
    ("x", "df"), [(10.828, 1), (13.816, 2), (16.266, 3), (18.467, 4), (29.588, 10),
                  (86.661, 50), (85.351, 49)])
def test_chi_square_sf_matches_the_table(x: float, df: int) -> None:
    assert chi_square_sf(x, df) == pytest.approx(0.001, rel=2e-3)


def test_zero_probability_tokens_are_never_drawn() -> None:
    logits = np.array([-1e4, 0.0, -1e4, 0.0, -1e4], dtype=np.float32)
    counts = Case(logits, SamplingParams(seed=5), [], []).draws(500)
    assert np.flatnonzero(counts).tolist() == [1, 3]
