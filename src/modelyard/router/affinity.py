"""Cache-aware routing: send a request to the replica whose prefix cache most likely holds
the start of its prompt, without keeping any state about past requests.

Servers that keep a prefix cache (vLLM, SGLang, llama.cpp's server, another modelyard
engine) answer a prompt faster, and report its start as `cached_tokens`, when they computed
that start for an earlier request. With several replicas chosen at random, a
conversation's next turn finds its earlier turns' cells only by chance. Here:

- **The key.** Each turn of a chat conversation repeats the earlier ones, so the key is
  made of what every turn starts with: the messages before the first assistant message
  (system, developer, the first user message), each cut to `prefix_chars` characters of
  its JSON, and the head of the tool definitions (rendered into the prompt's start). A
  text completion's key is its prompt's head. The caller's account (the request's
  `cache_scope`) is part of the key, so one tenant's history never steers another's
  routing (and engines reuse cells only within an account anyway).
- **The ring.** Consistent hashing: each replica has virtual nodes on a 64-bit ring in
  proportion to its weight, placed by hashing its name (so a replica added or removed moves
  only the keys it takes or held). A key's replicas in order are those met walking
  clockwise from the key's hash.
- **Bounded load** (Mirrokni et al., "Consistent Hashing with Bounded Loads"): the first
  replica in that order whose active requests, this one included, stay within
  ceil((1 + epsilon) x its weight's share of the active requests) takes the request; one
  above it passes the request on to the next. Some replica always qualifies.

Replicas that keep no prefix cache keep the weighted random choice: the replicas on the
ring take, together, their summed weight's share, and within it the ring decides. Breakers,
concurrency limits and retries stay with the caller, which passes only the replicas that
may take the request now (a retry without the one that failed: the next on the ring).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import orjson

from modelyard.config import DeploymentConfig
from modelyard.providers.base import ChatRequest
from modelyard.router.balancer import choose

T = TypeVar("T", bound=Hashable)

VNODES_PER_WEIGHT = 160
"""Virtual nodes of a replica of weight 1 (at least 1, at most MAX_VNODES each)."""
MAX_VNODES = 65536
PREFIX_CACHE_PROFILES = frozenset({"vllm", "sglang", "llamacpp", "passthrough"})


def keeps_prefix_cache(config: DeploymentConfig) -> bool:
    """Whether routing should follow this deployment's prefix cache: its `prefix_cache`,
    else true for the built-in engine and the profiles of self-hosted servers."""
    if config.prefix_cache is not None:
        return config.prefix_cache
    if config.kind == "local":
        return True
    return config.kind == "openai" and config.profile in PREFIX_CACHE_PROFILES


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def affinity_key(request: ChatRequest, prefix_chars: int) -> int:
    """The request's place on the ring: its account and its prompt's leading blocks."""
    parts = [(request.cache_scope or "").encode()]
    raw = request.prompt
    if raw is not None:
        parts.append(b"prompt")
        if raw.token_ids is not None:
            parts.append(orjson.dumps(list(raw.token_ids[:prefix_chars // 4])))
        else:
            parts.append((raw.text or "")[:prefix_chars].encode())
    else:
        for message in request.messages:
            if message.get("role") == "assistant":
                break
            parts.append(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)[:prefix_chars])
        if request.tools:
            parts.append(orjson.dumps(request.tools, option=orjson.OPT_SORT_KEYS)[:prefix_chars])
    return _hash(b"\x00".join(parts))


class Ring(Generic[T]):
    """A consistent-hash ring over `nodes` (each with a unique name and a weight > 0)."""

    def __init__(self, nodes: Sequence[tuple[str, float, T]],
                 vnodes_per_weight: int = VNODES_PER_WEIGHT) -> None:
        names = [name for name, _, _ in nodes]
        if len(set(names)) != len(names):
            raise ValueError("ring nodes need unique names")
        self.nodes = [node for _, _, node in nodes]
        points: list[tuple[int, int]] = []
        for index, (name, weight, _) in enumerate(nodes):
            count = max(1, min(MAX_VNODES, round(vnodes_per_weight * weight)))
            points += [(_hash(f"{name}\x00{i}".encode()), index) for i in range(count)]
        points.sort()
        self._points = [point for point, _ in points]
        self._owners = [owner for _, owner in points]

    def walk(self, key: int) -> Iterator[T]:
        """Every node once, in the order met walking clockwise from `key` (lazily: the
        walk usually stops at the first)."""
        seen: set[int] = set()
        start = bisect.bisect_left(self._points, key)
        size = len(self._points)
        for step in range(size):
            owner = self._owners[(start + step) % size]
            if owner not in seen:
                seen.add(owner)
                yield self.nodes[owner]
                if len(seen) == len(self.nodes):
                    return

    def order(self, key: int) -> list[T]:
        return list(self.walk(key))


def bounded_pick(order: Iterable[T], members: Collection[T], weight: Callable[[T], float],
                 load: Callable[[T], int], epsilon: float) -> T | None:
    """The first of `order` among `members` whose load with one more request stays within
    ceil((1 + epsilon) x its weight's share of the members' loads plus this request)."""
    if not members:
        return None
    total_weight = sum(weight(node) for node in members)
    active = sum(load(node) for node in members) + 1
    first = None
    for node in order:
        if node not in members:
            continue
        first = first or node
        bound = math.ceil((1 + epsilon) * active * weight(node) / total_weight - 1e-9)
        if load(node) + 1 <= bound:
            return node
    return first  # unreachable with every member in `order`: the bounds exceed the loads


class Affinity(Generic[T]):
    """The choice among a model's deployments (`T`, e.g. the catalog's routes) for one
    request, given those that may take it now."""

    def __init__(self, nodes: Sequence[tuple[str, T]], weight: Callable[[T], float],
                 load: Callable[[T], int], epsilon: float, prefix_chars: int) -> None:
        self.ring = Ring([(name, weight(node), node) for name, node in nodes])
        self.members = frozenset(node for _, node in nodes)
        self.weight = weight
        self.load = load
        self.epsilon = epsilon
        self.prefix_chars = prefix_chars

    def key(self, request: ChatRequest) -> int:
        return affinity_key(request, self.prefix_chars)

    def choose(self, candidates: Sequence[T], key: int, rng: random.Random) -> T | None:
        """One of `candidates`: by the ring (bounded load) among the ring's members, which
        as a group keep their weights' share against the others, chosen at random."""
        ringed = [c for c in candidates if c in self.members]
        others = [c for c in candidates if c not in self.members]
        if others:
            pool = sum(self.weight(c) for c in ringed)
            picked = choose([None, *others] if ringed else others,
                            lambda c: pool if c is None else self.weight(c), rng)
            if picked is not None:
                return picked
        return bounded_pick(self.ring.walk(key), set(ringed), self.weight, self.load,
                            self.epsilon)


def ring_names(names: Sequence[str]) -> list[str]:
    """`names` made unique (a repeated one gets #2, #3, ...), stable in their order."""
    used: set[str] = set()
    unique: list[str] = []
    for name in names:
        candidate, count = name, 1
        while candidate in used:
            count += 1
            candidate = f"{name}#{count}"
        used.add(candidate)
        unique.append(candidate)
    return unique
