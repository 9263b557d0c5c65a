"""Each sampling step on random logits against the plain reference in sampling_reference.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelyard.engine.sampling import (
    Sampler,
    apply_frequency_presence,
    apply_repetition_penalty,
    log_softmax,
    min_p_indices,
    nucleus,
    softmax,
    top_k_indices,
    top_logprobs,
)
from modelyard.engine.sequence import SamplingParams
from tests.engine.sampling_reference import (
    ref_adjusted,
    ref_frequency_presence,
    ref_log_softmax,
    ref_logit_bias,
    ref_min_p,
    ref_nucleus,
    ref_repetition_penalty,
    ref_softmax,
    ref_top_k_values,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
TOLERANCE = 1e-9

logit_arrays = hnp.arrays(
    np.float32,
    st.integers(1, 600),  # past 64 and 512, so nucleus has to widen its candidate set
    elements=st.floats(-30, 30, width=32),
)
# few distinct values, so ties are common
tied_arrays = hnp.arrays(np.float64, st.integers(1, 60), elements=st.integers(-3, 3).map(float))


def logits_and_ids(max_n: int = 100, unique: bool = False) -> st.SearchStrategy[
        tuple[npt.NDArray[np.float32], list[int]]]:
    return st.integers(1, max_n).flatmap(lambda n: st.tuples(
        hnp.arrays(np.float32, n, elements=st.floats(-30, 30, width=32)),
        st.lists(st.integers(0, n - 1), max_size=2 * n, unique=unique)))


# -- softmax and log_softmax -------------------------------------------------------------------


@SETTINGS
@given(logit_arrays, st.floats(0.05, 5.0))
def test_softmax_matches_the_definition(
    logits: npt.NDArray[np.float32], temperature: float
) -> None:
    probs = softmax(logits, temperature)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, ref_softmax(logits, temperature), rtol=1e-9, atol=1e-15)
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)


@SETTINGS
@given(logit_arrays)
def test_log_softmax_matches_the_definition(logits: npt.NDArray[np.float32]) -> None:
    result = log_softmax(logits)
    np.testing.assert_allclose(result, ref_log_softmax(logits), rtol=1e-9, atol=1e-12)
    assert np.exp(result).sum() == pytest.approx(1.0, abs=1e-9)


def test_softmax_and_log_softmax_are_stable_for_huge_logits() -> None:
    logits = np.array([1000.0, 1000.0, -1000.0], dtype=np.float32)
    np.testing.assert_allclose(softmax(logits), [0.5, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(log_softmax(logits), [np.log(0.5), np.log(0.5), -2000 - np.log(2)])


def test_temperature_sharpens_and_flattens() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    np.testing.assert_allclose(softmax(logits, 1.0), [0.6, 0.3, 0.1], rtol=1e-6)
    # T = 0.5 squares the probabilities (then renormalises)
    np.testing.assert_allclose(softmax(logits, 0.5), np.array([0.36, 0.09, 0.01]) / 0.46,
                               rtol=1e-5)
    assert softmax(logits, 100.0).max() < 0.34


# -- top_k ---------------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(tied_arrays, logit_arrays.map(lambda a: a.astype(np.float64))),
       st.integers(-1, 620))
def test_top_k_indices_are_the_k_largest(values: npt.NDArray[np.float64], k: int) -> None:
    ids = top_k_indices(values, k)
    n = len(values)
    assert len(set(ids.tolist())) == len(ids)
    if k <= 0 or k >= n:
        assert sorted(ids.tolist()) == list(range(n))
        return
    assert len(ids) == k
    # ties at the k-th value may go either way: compare the values, not the indices
    np.testing.assert_array_equal(np.sort(values[ids])[::-1], ref_top_k_values(values, k))


# -- top_p (nucleus) -------------------------------------------------------------------------


@SETTINGS
@given(logit_arrays, st.floats(0.01, 1.0))
def test_nucleus_is_the_smallest_most_likely_set_reaching_top_p(
    logits: npt.NDArray[np.float32], top_p: float
) -> None:
    probs = softmax(logits)
    kept = nucleus(probs, top_p)

    assert len(set(kept.tolist())) == len(kept) >= 1
    inside, outside = probs[kept], np.delete(probs, kept)
    if outside.size:  # the most likely tokens ...
        assert inside.min() >= outside.max()
    # ... reaching top_p ...
    assert inside.sum() >= top_p - TOLERANCE or len(kept) == len(probs)
    # ... and no smaller set would (drop the least likely kept one and it falls short)
    assert inside.sum() - inside.min() < top_p + TOLERANCE

    cumulative = np.cumsum(np.sort(probs)[::-1])
    if not np.any(np.abs(cumulative - top_p) < TOLERANCE):  # no rounding-close call
        expected = ref_nucleus(probs, top_p)
        assert len(kept) == len(expected)
        np.testing.assert_array_equal(np.sort(probs[kept]), np.sort(probs[expected]))


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
    assert len(kept) == len(ref_nucleus(probs, 0.9))
    assert len(kept) > 0.9 * n - 1


# -- min_p ---------------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(logit_arrays, tied_arrays.map(lambda a: a.astype(np.float32))),
       st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_at_least_min_p_of_the_best(
    logits: npt.NDArray[np.float32], min_p: float
) -> None:
    probs = softmax(logits)
    kept = min_p_indices(probs, min_p)
    assert kept.tolist() == ref_min_p(probs, min_p)
    assert int(np.argmax(probs)) in kept.tolist()


# -- penalties and bias --------------------------------------------------------------------------


@SETTINGS
@given(logits_and_ids(), st.floats(0.5, 3.0))
def test_repetition_penalty_divides_positive_multiplies_negative(
    case: tuple[npt.NDArray[np.float32], list[int]], penalty: float
) -> None:
    logits, ids = case  # ids may repeat: each token is penalised once all the same
    x = logits.copy()
    assert apply_repetition_penalty(x, np.asarray(ids, dtype=np.intp), penalty) is None
    np.testing.assert_allclose(x, ref_repetition_penalty(logits, ids, penalty), rtol=1e-6,
                               atol=1e-30)  # float32 underflow
    untouched = np.setdiff1d(np.arange(len(logits)), ids)
    np.testing.assert_array_equal(x[untouched], logits[untouched])


@SETTINGS
@given(logits_and_ids(unique=True), st.data(), st.floats(-2.0, 2.0), st.floats(-2.0, 2.0))
def test_frequency_and_presence_follow_openai(
    case: tuple[npt.NDArray[np.float32], list[int]], data: st.DataObject, frequency: float,
    presence: float,
) -> None:
    logits, ids = case  # the sampler passes each token once, with its count
    counts = data.draw(st.lists(st.integers(0, 20), min_size=len(ids), max_size=len(ids)))
    x = logits.copy()
    apply_frequency_presence(x, np.asarray(ids, dtype=np.intp),
                             np.asarray(counts, dtype=np.float32), frequency, presence)
    expected = ref_frequency_presence(logits, dict(zip(ids, counts, strict=True)), frequency,
                                      presence)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(logit_arrays, st.data())
def test_logit_bias_is_added(logits: npt.NDArray[np.float32], data: st.DataObject) -> None:
    bias = data.draw(st.dictionaries(st.integers(0, len(logits) - 1),
                                     st.floats(-100.0, 100.0), max_size=10))
    sampler = Sampler(SamplingParams(logit_bias=bias))
    np.testing.assert_allclose(sampler.adjusted(logits), ref_logit_bias(logits, bias),
                               rtol=1e-6, atol=1e-5)


@SETTINGS
@given(
    logits_and_ids(max_n=60),
    st.lists(st.integers(0, 59), max_size=30),
    st.dictionaries(st.integers(0, 59), st.floats(-10.0, 10.0), max_size=5),
    st.one_of(st.just(1.0), st.floats(0.5, 3.0)),
    st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
    st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
)
def test_adjusted_logits_accumulate_over_accepts_like_the_reference(
    case: tuple[npt.NDArray[np.float32], list[int]], outputs: list[int],
    bias: dict[int, float], repetition: float, frequency: float, presence: float,
) -> None:
    logits, prompt = case
    original, n = logits.copy(), len(logits)
    outputs = [t % n for t in outputs]
    bias = {t % n: b for t, b in bias.items()}
    params = SamplingParams(logit_bias=bias, repetition_penalty=repetition,
                            frequency_penalty=frequency, presence_penalty=presence)
    sampler = Sampler(params, prompt)
    for step, token in enumerate(outputs):
        sampler.accept(token)
        np.testing.assert_allclose(
            sampler.adjusted(logits), ref_adjusted(logits, params, prompt, outputs[: step + 1]),
            rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(logits, original)  # the caller's logits: untouched


@pytest.mark.parametrize(
    ("params", "prompt", "outputs", "expected"),
    [
        # bias before the repetition penalty: (1 + 1) / 2, not 1 / 2 + 1
        (SamplingParams(logit_bias={0: 1.0}, repetition_penalty=2.0), [0], [], 1.0),
        # a negative logit is multiplied: -1 * 2
        (SamplingParams(repetition_penalty=2.0), [], [1], -2.0),
        # the repetition penalty before frequency: 2 / 2 - 1, not (2 - 1) / 2
        (SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), [], [2], 0.0),
        # three times: 2 - 3 * 0.5 - 0.25
        (SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [2], [2, 2, 2], 0.25),
        # the prompt counts for the repetition penalty only
        (SamplingParams(frequency_penalty=1.0, presence_penalty=1.0), [2, 2], [], 2.0),
    ],
)
def test_the_order_of_bias_and_penalties(params: SamplingParams, prompt: list[int],
                                         outputs: list[int], expected: float) -> None:
    logits = np.array([1.0, -1.0, 2.0], dtype=np.float32)
    token = outputs[0] if outputs else prompt[0]
    sampler = Sampler(params, prompt)
    for t in outputs:
        sampler.accept(t)
    assert sampler.adjusted(logits)[token] == pytest.approx(expected)


# -- top logprobs --------------------------------------------------------------------------------


@SETTINGS
@given(logit_arrays, st.integers(1, 30))
def test_top_logprobs_are_the_best_first(logits: npt.NDArray[np.float32], k: int) -> None:
    logprobs = ref_log_softmax(logits)
    top = top_logprobs(logprobs, k)
    assert len(top) == min(k, len(logits))
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    np.testing.assert_array_equal(values, ref_top_k_values(logprobs, k))
    assert all(logprobs[i] == v for i, v in top)
    assert len(Counter(i for i, _ in top)) == len(top)
