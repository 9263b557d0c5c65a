"""Per-model sampling defaults: a request overrides them field by field, in the one step
both the engine and the upstream profiles take (`Sampling.over`)."""

from __future__ import annotations

from modelyard.providers.base import ChatRequest
from modelyard.sampling import Sampling

PROVIDER_LIKE = Sampling(temperature=0.7, top_p=0.7, top_k=50, min_p=0.05,
                         frequency_penalty=0.5, presence_penalty=0.1, repetition_penalty=1.1)


def test_a_request_that_names_nothing_gets_every_default() -> None:
    params = ChatRequest("r", []).to_sampling_params(PROVIDER_LIKE, max_tokens=8)
    assert (params.temperature, params.top_p, params.top_k, params.min_p,
            params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (
        0.7, 0.7, 50, 0.05, 0.5, 0.1, 1.1)


def test_each_given_field_wins_on_its_own() -> None:
    request = ChatRequest("r", [], sampling=Sampling(temperature=0.0, top_k=-1))
    params = request.to_sampling_params(PROVIDER_LIKE, max_tokens=8)
    assert params.temperature == 0.0   # 0 is a value, not "not given"
    assert params.top_k == 0           # -1 means off
    assert params.top_p == 0.7
    assert params.repetition_penalty == 1.1


def test_a_field_set_nowhere_is_openais_default() -> None:
    params = ChatRequest("r", [], sampling=Sampling(top_p=0.5)).to_sampling_params(
        Sampling(), max_tokens=8)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
        1.0, 0.5, 0, 1.0)


def test_upstream_fields_keep_their_types() -> None:
    fields = ChatRequest("r", [], sampling=Sampling(temperature=0.2)).sampling_over(
        Sampling(top_k=50, temperature=0.9)).given()
    assert fields == {"temperature": 0.2, "top_k": 50}
    assert isinstance(fields["top_k"], int)
