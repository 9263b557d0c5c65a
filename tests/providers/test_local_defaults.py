"""Per-model sampling defaults: a request overrides them field by field."""

from __future__ import annotations

from modelyard.config import SamplingDefaults
from modelyard.providers.base import ChatRequest
from modelyard.providers.local import with_defaults

PROVIDER_LIKE = SamplingDefaults(temperature=0.7, top_p=0.7, top_k=50, min_p=0.05,
                                 frequency_penalty=0.5, presence_penalty=0.1,
                                 repetition_penalty=1.1)


def test_a_request_that_names_nothing_gets_every_default() -> None:
    merged = with_defaults(ChatRequest("r", []), PROVIDER_LIKE)
    assert merged == {"temperature": 0.7, "top_p": 0.7, "top_k": 50, "min_p": 0.05,
                      "frequency_penalty": 0.5, "presence_penalty": 0.1,
                      "repetition_penalty": 1.1}


def test_each_given_field_wins_on_its_own() -> None:
    merged = with_defaults(ChatRequest("r", [], temperature=0.0, top_k=-1), PROVIDER_LIKE)
    assert merged["temperature"] == 0.0   # 0 is a value, not "not given"
    assert merged["top_k"] == 0           # -1 means off
    assert merged["top_p"] == 0.7
    assert merged["repetition_penalty"] == 1.1
