"""The sampling fields: one definition, with their types and ranges.

The API's request models declare them with these types, the config's `[model.defaults]`
and `[models.defaults]` are a `Sampling`, a request carries the ones it set as a
`Sampling`, and `Sampling.over` is the one step that lays a request's fields over a
model's defaults, for the built-in engine (`ChatRequest.to_sampling_params`) and for an
upstream (the fields given are sent as they are: an integer stays an integer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict

MAX_TOP_K = 2**31 - 1

Temperature = Annotated[float, Strict(), Field(ge=0, le=2)]
TopP = Annotated[float, Strict(), Field(gt=0, le=1)]
TopK = Annotated[int, Strict(), Field(ge=-1, le=MAX_TOP_K)]
"""0 or -1: off."""
MinP = Annotated[float, Strict(), Field(ge=0, le=1)]
Penalty = Annotated[float, Strict(), Field(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Strict(), Field(gt=0, le=2)]


@dataclass(frozen=True)
class Sampling:
    """Sampling fields; None is "not given". Validated by pydantic where it is read from
    outside (the config file, a request body); built directly inside."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None

    def given(self) -> dict[str, float | int]:
        """The fields set, by name, with their own types."""
        return {name: value for name in SAMPLING_FIELDS
                if (value := getattr(self, name)) is not None}

    def over(self, defaults: Sampling) -> Sampling:
        """These fields, each one not given taken from `defaults`."""
        given: dict[str, Any] = dict(self.given())
        return dataclasses.replace(defaults, **given)


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sampling))

NEUTRAL = Sampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, frequency_penalty=0.0,
                   presence_penalty=0.0, repetition_penalty=1.0)
"""What sampling does when nothing sets a field (OpenAI's defaults: no change to the
model's distribution)."""
