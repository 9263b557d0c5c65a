"""Sampling: softmax and nucleus against plain references, and the draws themselves."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelyard.engine.sampling import Sampler, nucleus, softmax
from modelyard.engine.sequence import SamplingParams

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
TOLERANCE = 1e-9

logit_arrays = hnp.arrays(
    np.float32,
    st.integers(1, 600),  # past 64 and 512, so nucleus has to widen its candidate set
    elements=st.floats(-30, 30, width=32),
)
top_ps = st.floats(0.01, 1.0)


def reference_softmax(logits: npt.NDArray[np.float32], temperature: float) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def reference_nucleus_size(probs: np.ndarray, top_p: float) -> tuple[int, np.ndarray]:
    """From the definition: sort descending, cumulate, smallest prefix reaching top_p."""
    ordered = np.sort(probs)[::-1]
    cumulative = np.cumsum(ordered)
    for k in range(len(ordered)):
        if cumulative[k] >= top_p:
            return k + 1, cumulative
    return len(ordered), cumulative


def logits_of(probs: list[float]) -> npt.NDArray[np.float32]:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


# -- softmax -------------------------------------------------------------------------------


@SETTINGS
@given(logit_arrays, st.floats(0.05, 5.0))
def test_softmax_matches_the_definition(
    logits: npt.NDArray[np.float32], temperature: float
) -> None:
    probs = softmax(logits, temperature)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, reference_softmax(logits, temperature), rtol=1e-9,
                               atol=1e-15)
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)


def test_softmax_is_stable_for_huge_logits() -> None:
    probs = softmax(np.array([1000.0, 1000.0, -1000.0], dtype=np.float32))
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.0], atol=1e-12)


def test_temperature_sharpens_and_flattens() -> None:
    logits = logits_of([0.6, 0.3, 0.1])
    np.testing.assert_allclose(softmax(logits, 1.0), [0.6, 0.3, 0.1], rtol=1e-6)
    # T = 0.5 squares the probabilities (then renormalises)
    squared = np.array([0.36, 0.09, 0.01]) / 0.46
    np.testing.assert_allclose(softmax(logits, 0.5), squared, rtol=1e-5)
    assert softmax(logits, 100.0).max() < 0.34


# -- nucleus -------------------------------------------------------------------------------


@SETTINGS
@given(logit_arrays, top_ps)
def test_nucleus_is_the_smallest_most_likely_set_reaching_top_p(
    logits: npt.NDArray[np.float32], top_p: float
) -> None:
    probs = softmax(logits)
    kept = nucleus(probs, top_p)

    assert len(set(kept.tolist())) == len(kept) >= 1
    inside = probs[kept]
    outside = np.delete(probs, kept)
    # the most likely tokens ...
    if outside.size:
        assert inside.min() >= outside.max()
    # ... reaching top_p ...
    assert inside.sum() >= top_p - TOLERANCE or len(kept) == len(probs)
    # ... and no smaller set would (drop the least likely kept one and it falls short)
    assert inside.sum() - inside.min() < top_p + TOLERANCE

    size, cumulative = reference_nucleus_size(probs, top_p)
    if not np.any(np.abs(cumulative - top_p) < TOLERANCE):  # no rounding-close call
        assert len(kept) == size
        np.testing.assert_allclose(np.sort(inside), np.sort(probs)[::-1][:size][::-1])


@pytest.mark.parametrize(
    ("probs", "top_p", "expected"),
    [
        ([0.1, 0.5, 0.15, 0.25], 0.5, [1]),
        ([0.1, 0.5, 0.15, 0.25], 0.51, [1, 3]),
        ([0.1, 0.5, 0.15, 0.25], 0.75, [1, 3]),
        ([0.1, 0.5, 0.15, 0.25], 0.76, [1, 3, 2]),
        ([0.1, 0.5, 0.15, 0.25], 1.0, [1, 3, 2, 0]),
        ([1.0, 0.0, 0.0], 0.9, [0]),
    ],
)
def test_nucleus_small_cases(probs: list[float], top_p: float, expected: list[int]) -> None:
    assert nucleus(np.asarray(probs, dtype=np.float64), top_p).tolist() == expected


@pytest.mark.parametrize("n", [63, 64, 65, 513, 1000])
def test_nucleus_widens_past_its_first_candidates(n: int) -> None:
    probs = np.full(n, 1.0 / n)
    kept = nucleus(probs, 0.9)
    size, _ = reference_nucleus_size(probs, 0.9)
    assert len(kept) == size
    assert size > 0.9 * n - 1


# -- Sampler ---------------------------------------------------------------------------------


@SETTINGS
@given(
    hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-30, 30, width=32)),
    st.sampled_from([0.0, 1e-6]),
    st.integers(0, 2**32 - 1),
)
def test_greedy_is_argmax(logits: npt.NDArray[np.float32], temperature: float, seed: int) -> None:
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=0.5, seed=seed))
    assert sampler.greedy
    assert sampler.sample(logits) == int(np.argmax(logits))


def test_non_greedy_at_small_but_real_temperature() -> None:
    assert not Sampler(SamplingParams(temperature=0.01)).greedy


def draws(params: SamplingParams, logits: npt.NDArray[np.float32], n: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(logits) for _ in range(n)]


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    one = draws(SamplingParams(temperature=1.0, seed=123), logits, 200)
    two = draws(SamplingParams(temperature=1.0, seed=123), logits, 200)
    other = draws(SamplingParams(temperature=1.0, seed=124), logits, 200)
    assert one == two
    assert one != other
    assert len(set(one)) > 10  # really random, not stuck on one token


def test_seeded_draws_with_top_p_are_reproducible() -> None:
    logits = np.random.default_rng(1).normal(size=300).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.7, seed=7)
    assert draws(params, logits, 100) == draws(params, logits, 100)


def chi_square(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001 (the seed makes the check deterministic anyway)
CHI2_CRITICAL_P001 = {1: 10.83, 2: 13.82, 3: 16.27}


@pytest.mark.parametrize(
    ("probs", "temperature", "top_p", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.4], 1.0, 1.0, [0.1, 0.2, 0.3, 0.4]),
        # T = 0.5 squares: 1, 4, 9, 16 over 30
        ([0.1, 0.2, 0.3, 0.4], 0.5, 1.0, [1 / 30, 4 / 30, 9 / 30, 16 / 30]),
        # top_p 0.75 keeps {0.5, 0.3}, renormalised
        ([0.5, 0.3, 0.15, 0.05], 1.0, 0.75, [0.625, 0.375, 0.0, 0.0]),
    ],
)
def test_draws_follow_the_distribution(
    probs: list[float], temperature: float, top_p: float, expected: list[float]
) -> None:
    n = 8000
    drawn = draws(SamplingParams(temperature=temperature, top_p=top_p, seed=2024),
                  logits_of(probs), n)
    counts = np.bincount(drawn, minlength=len(probs)).astype(np.float64)
    expected_probs = np.asarray(expected)
    support = expected_probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the nucleus"
    statistic = chi_square(counts[support], expected_probs[support])
    assert statistic < CHI2_CRITICAL_P001[int(support.sum()) - 1]


def test_the_chi_square_check_can_fail() -> None:
    # the chi-square test above must be able to fail: argmax-only draws are far off
    counts = np.array([0.0, 0.0, 0.0, 8000.0])
    assert chi_square(counts, np.array([0.1, 0.2, 0.3, 0.4])) > CHI2_CRITICAL_P001[3]


@pytest.mark.parametrize("seed", range(5))
def test_tokens_outside_the_nucleus_are_never_drawn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=100) * 3).astype(np.float32)
    top_p = float(rng.uniform(0.3, 0.9))
    allowed = set(nucleus(softmax(logits), top_p).tolist())
    assert len(allowed) < 100

    drawn = draws(SamplingParams(temperature=1.0, top_p=top_p, seed=seed), logits, 500)
    assert set(drawn) <= allowed
    assert len(set(drawn)) > 1 or len(allowed) == 1


def test_zero_probability_tokens_are_never_drawn() -> None:
    logits = np.array([-1e4, 0.0, -1e4, 0.0, -1e4], dtype=np.float32)
    drawn = draws(SamplingParams(temperature=1.0, seed=5), logits, 500)
    assert set(drawn) == {1, 3}
