"""Token sampling on a sequence's logits, in numpy.

Each sequence owns a `Sampler` with its own random generator, so sequences decoded in
the same batch never share randomness and a `seed` makes a sequence reproducible.

Steps, in order (OpenAI / llama.cpp semantics):

1. temperature 0: greedy (argmax), no randomness;
2. divide the logits by the temperature and softmax;
3. top_p: keep the smallest set of most likely tokens whose mass reaches top_p;
4. draw from what is left, renormalised.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from modelyard.engine.sequence import SamplingParams

GREEDY_EPSILON = 1e-5
_FIRST_TOP_P_CANDIDATES = 64

Logits = npt.NDArray[np.float32]


def softmax(logits: Logits, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    weights = np.exp(scaled)
    result: npt.NDArray[np.float64] = weights / weights.sum()
    return result


def nucleus(probs: npt.NDArray[np.float64], top_p: float) -> npt.NDArray[np.intp]:
    """Indices of the smallest most-likely set whose total probability is >= top_p.

    Sorting the whole vocabulary each step is the expensive part, so look at the top
    candidates first and widen only if they do not reach top_p.
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
            result: npt.NDArray[np.intp] = candidates[: min(keep, len(candidates))]
            return result
        k = min(k * 8, n)


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.greedy = params.temperature < GREEDY_EPSILON
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: Logits) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        probs = softmax(logits, self.params.temperature)
        if self.params.top_p < 1.0:
            kept = nucleus(probs, self.params.top_p)
            kept_probs = probs[kept]
            choice = self._draw(kept_probs / kept_probs.sum())
            return int(kept[choice])
        return self._draw(probs)

    def _draw(self, probs: npt.NDArray[np.float64]) -> int:
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return min(index, int(probs.shape[0]) - 1)
