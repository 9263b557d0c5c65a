"""The per-sequence Sampler: greedy decoding, logit bias, penalty state, logprobs and seeds.

The steps one by one are in test_sampling_steps.py, the distribution the draws come from in
test_sampling_pipeline.py; the reference they all compare with is sampling_reference.py.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelyard.engine.sampling import Sample, Sampler, choice_rngs
from modelyard.engine.sequence import SamplingParams
from tests.engine.sampling_reference import (
    F64,
    implementation_distribution,
    ref_adjusted,
    ref_log_softmax,
    ref_top_k_values,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

logit_arrays = hnp.arrays(np.float32, st.integers(2, 200), elements=st.floats(-30, 30, width=32))


def draws(params: SamplingParams, logits: npt.NDArray[np.float32], n: int,
          prompt: list[int] | None = None) -> list[int]:
    sampler = Sampler(params, prompt)
    return [sampler.sample(logits).token for _ in range(n)]


# -- greedy ----------------------------------------------------------------------------------------


@SETTINGS
@given(logit_arrays, st.sampled_from([0.0, 1e-6]), st.integers(0, 2**32 - 1))
def test_greedy_is_argmax(logits: npt.NDArray[np.float32], temperature: float, seed: int) -> None:
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=0.5, seed=seed))
    assert sampler.greedy
    assert sampler.sample(logits) == Sample(int(np.argmax(logits)))


def test_non_greedy_at_small_but_real_temperature() -> None:
    assert not Sampler(SamplingParams(temperature=0.01)).greedy


@SETTINGS
@given(logit_arrays, st.data())
def test_greedy_applies_the_logit_bias(logits: npt.NDArray[np.float32],
                                       data: st.DataObject) -> None:
    token = data.draw(st.integers(0, len(logits) - 1))
    forced = Sampler(SamplingParams(temperature=0.0, logit_bias={token: 100.0}))
    assert forced.sample(logits).token == token
    banned = Sampler(SamplingParams(temperature=0.0, logit_bias={token: -100.0}))
    assert banned.sample(logits).token != token


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_a_bias_of_100_forces_or_bans_a_token_when_sampling(temperature: float) -> None:
    logits = np.random.default_rng(0).uniform(-5, 5, 20).astype(np.float32)
    forced = SamplingParams(temperature=temperature, logit_bias={7: 100.0}, seed=1)
    assert implementation_distribution(logits, forced, [], [])[7] == 1.0
    assert set(draws(forced, logits, 200)) == {7}
    banned = SamplingParams(temperature=temperature, logit_bias={int(np.argmax(logits)): -100.0},
                            seed=1)
    assert implementation_distribution(logits, banned, [], [])[np.argmax(logits)] == 0.0
    assert int(np.argmax(logits)) not in draws(banned, logits, 2000)


@SETTINGS
@given(
    hnp.arrays(np.float32, st.integers(2, 40), elements=st.floats(-10, 10, width=32)),
    st.lists(st.integers(0, 39), max_size=10),
    st.one_of(st.just(1.0), st.floats(1.0, 3.0)),
    st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
    st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
)
def test_greedy_decoding_applies_penalties_step_by_step_like_the_reference(
    logits: npt.NDArray[np.float32], prompt: list[int], repetition: float, frequency: float,
    presence: float,
) -> None:
    prompt = [t % len(logits) for t in prompt]
    params = SamplingParams(temperature=0.0, repetition_penalty=repetition,
                            frequency_penalty=frequency, presence_penalty=presence)
    sampler = Sampler(params, prompt)
    outputs: list[int] = []
    for _ in range(20):
        adjusted = ref_adjusted(logits, params, prompt, outputs)
        best, second = np.sort(adjusted)[::-1][:2]
        if best - second < 1e-4:  # float32 rounding could pick either: stop comparing
            return
        token = sampler.sample(logits).token  # sample() records the token for the penalties
        assert token == int(np.argmax(adjusted))
        outputs.append(token)


def test_a_frequency_penalty_makes_greedy_decoding_move_on() -> None:
    logits = np.array([3.0, 2.5, 2.0, -5.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, frequency_penalty=0.4)
    # 3 / 2.6 / 2.2 (ties go to the lowest id) ...
    assert draws(params, logits, 9) == [0, 0, 1, 0, 1, 2, 0, 1, 2]


# -- the repetition penalty reaches the prompt -----------------------------------------------


@SETTINGS
@given(logit_arrays, st.lists(st.integers(0, 199), max_size=20), st.floats(0.5, 3.0))
def test_the_repetition_penalty_covers_the_prompt(
    logits: npt.NDArray[np.float32], prompt: list[int], penalty: float
) -> None:
    prompt = [t % len(logits) for t in prompt]
    params = SamplingParams(repetition_penalty=penalty)
    np.testing.assert_allclose(Sampler(params, prompt).adjusted(logits),
                               ref_adjusted(logits, params, prompt, []), rtol=1e-6, atol=1e-30)


def test_a_prompt_token_loses_to_the_repetition_penalty() -> None:
    logits = np.array([2.0, 1.5, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert draws(params, logits, 1) == [0]
    assert draws(params, logits, 1, prompt=[0]) == [1]  # 2 / 2 < 1.5
    assert draws(params, logits, 3, prompt=[0, 0, 2]) == [1, 0, 0]  # 1.5 / 2 < 1


# -- logprobs --------------------------------------------------------------------------------------


@SETTINGS
@given(
    hnp.arrays(np.float32, st.integers(20, 100), elements=st.floats(-20, 20, width=32)),
    st.integers(1, 20),
    st.lists(st.integers(0, 19), max_size=8),
    st.dictionaries(st.integers(0, 19), st.floats(-100, 100), max_size=3),
    st.one_of(st.just(1.0), st.floats(0.5, 2.0)),
    st.floats(-2.0, 2.0),
    st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    st.integers(0, 2**32 - 1),
)
def test_logprobs_are_of_the_adjusted_logits_before_temperature(
    logits: npt.NDArray[np.float32], k: int, outputs: list[int], bias: dict[int, float],
    repetition: float, frequency: float, temperature: float, seed: int,
) -> None:
    prompt = [1, 2, 3]

    def sample(temperature: float) -> tuple[Sample, F64]:
        params = SamplingParams(temperature=temperature, top_p=0.9, logit_bias=bias,
                                repetition_penalty=repetition, frequency_penalty=frequency,
                                logprobs=True, top_logprobs=k, seed=seed)
        sampler = Sampler(params, prompt)
        for token in outputs:
            sampler.accept(token)
        return sampler.sample(logits), ref_log_softmax(ref_adjusted(logits, params, prompt,
                                                                    outputs))

    result, expected = sample(temperature)
    assert result.logprob is not None
    assert result.logprob.logprob == pytest.approx(expected[result.token], rel=1e-5, abs=1e-4)
    top = result.logprob.top
    assert len(top) == k
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    np.testing.assert_allclose(values, ref_top_k_values(expected, k), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(values, expected[[i for i, _ in top]], rtol=1e-5, atol=1e-4)
    # the temperature changes what is drawn, never the logprobs
    other, _ = sample(1.7)
    assert other.logprob is not None
    assert other.logprob.top == top
    assert other.logprob.logprob == pytest.approx(expected[other.token], rel=1e-5, abs=1e-4)


def test_no_logprobs_unless_asked() -> None:
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert Sampler(SamplingParams(seed=0)).sample(logits).logprob is None
    sample = Sampler(SamplingParams(seed=0, logprobs=True)).sample(logits)
    assert sample.logprob is not None
    assert sample.logprob.top == ()


# -- seeds -----------------------------------------------------------------------------------------


def test_same_seed_same_draws_different_seed_different_draws() -> None:
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    one = draws(SamplingParams(temperature=1.0, seed=123), logits, 200)
    two = draws(SamplingParams(temperature=1.0, seed=123), logits, 200)
    other = draws(SamplingParams(temperature=1.0, seed=124), logits, 200)
    assert one == two
    assert one != other
    assert len(set(one)) > 10  # really random, not stuck on one token


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_seeded_samplers_with_penalties_are_reproducible(seed: int, other_seed: int) -> None:
    logits = np.random.default_rng(1).normal(size=300).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.7, top_k=50, min_p=0.01,
                            repetition_penalty=1.2, frequency_penalty=0.3, seed=seed)
    first = draws(params, logits, 50, prompt=[5, 6])
    assert first == draws(params, logits, 50, prompt=[5, 6])
    # the engine hands each choice a generator of its own
    sampler = Sampler(params, [5, 6], np.random.default_rng(seed))
    assert first == [sampler.sample(logits).token for _ in range(50)]
    if other_seed != seed:
        other = SamplingParams(temperature=0.8, top_p=0.7, top_k=50, min_p=0.01,
                               repetition_penalty=1.2, frequency_penalty=0.3, seed=other_seed)
        assert first != draws(other, logits, 50, prompt=[5, 6])


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1, 2**64 - 1])
def test_every_64_bit_seed_is_accepted_and_taken_modulo_2_64(seed: int) -> None:
    logits = np.random.default_rng(2).normal(size=50).astype(np.float32)
    one = draws(SamplingParams(temperature=1.0, seed=seed), logits, 50)
    assert one == draws(SamplingParams(temperature=1.0, seed=seed % 2**64), logits, 50)
    assert [len(choice_rngs(seed, n)) for n in (1, 3)] == [1, 3]


class FixedDraw(np.random.Generator):
    """A generator whose uniform draw is chosen by the test."""

    def __init__(self, u: float) -> None:
        super().__init__(np.random.PCG64(0))
        self.u = u

    def random(self, *args: object, **kwargs: object) -> float:  # type: ignore[override]
        return self.u


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("u", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_the_draw_walks_the_candidates_in_token_id_order(u: float, top_p: float) -> None:
    """Values order the candidates nowhere: a tiny change in the logits that reorders two
    near-equal candidates moves the draw only if `u` falls right at their boundary."""
    logits = np.full(40, -50.0, dtype=np.float32)
    logits[[31, 4, 17, 9]] = [2.0, 1.0, 2.0 + 1e-6, 1.5]   # 31 and 17 nearly tie
    params = SamplingParams(temperature=1.0, top_k=4, top_p=top_p)
    ids = np.array([4, 9, 17, 31])
    probs = np.exp(logits[ids].astype(np.float64))
    probs /= probs.sum()
    if top_p < 1.0:
        keep = np.argsort(-probs, kind="stable")
        keep = np.sort(keep[: int(np.searchsorted(np.cumsum(probs[keep]), top_p)) + 1])
        ids, probs = ids[keep], probs[keep] / probs[keep].sum()
    expected = int(ids[np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right")])
    nudged = logits.copy()
    nudged[17] -= 2e-6   # 17 now just below 31: argpartition's order may change
    for row in (logits, nudged):
        assert Sampler(params, rng=FixedDraw(u)).sample(row).token == expected
