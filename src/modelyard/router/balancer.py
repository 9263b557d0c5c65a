"""Weighted random choice among the deployments that may take a request now."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def choose(candidates: Sequence[T], weight: Callable[[T], float],
           rng: random.Random | None = None) -> T | None:
    """One candidate, each with probability weight / total weight; None if there are none."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    total = sum(weight(c) for c in candidates)
    point = (rng or random).random() * total
    for candidate in candidates:
        point -= weight(candidate)
        if point < 0:
            return candidate
    return candidates[-1]
