"""Cache-aware routing (router/affinity.py) without a network: the ring, the key, bounded
load and the choice among candidates."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from modelyard.config import DeploymentConfig, RouterConfig
from modelyard.providers.base import ChatRequest, RawPrompt
from modelyard.router.affinity import (
    Affinity,
    Ring,
    affinity_key,
    bounded_pick,
    keeps_prefix_cache,
    ring_names,
)
from modelyard.router.catalog import RoutedModel

_RNG = random.Random(7)
KEYS = [_RNG.getrandbits(64) for _ in range(4000)]


@dataclass(eq=False)
class Replica:
    name: str
    weight: float = 1.0
    active: int = 0


def _ring(*replicas: Replica) -> Ring[Replica]:
    return Ring([(r.name, r.weight, r) for r in replicas])


def _owners(ring: Ring[Replica]) -> list[str]:
    return [ring.order(key)[0].name for key in KEYS]


def _affinity(*replicas: Replica, epsilon: float = 0.5) -> Affinity[Replica]:
    return Affinity([(r.name, r) for r in replicas], lambda r: r.weight, lambda r: r.active,
                    epsilon, 1024)


def _chat(messages: list[dict[str, Any]], account: str | None = "acct-1",
          **fields: Any) -> ChatRequest:
    return ChatRequest("r", messages, cache_scope=account, **fields)


def _conversation(topic: str, turns: int) -> list[list[dict[str, Any]]]:
    """The messages of each turn: the earlier turns, their answers, a new question."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    each = []
    for turn in range(turns):
        messages = [*messages, {"role": "user", "content": f"{topic}: question {turn}"}]
        each.append(messages)
        messages = [*messages, {"role": "assistant", "content": f"answer {turn} on {topic}"}]
    return each


# -- the ring ------------------------------------------------------------------------------

def test_a_key_keeps_its_replica_and_every_replica_comes_once_in_its_order() -> None:
    a, b, c = Replica("a"), Replica("b"), Replica("c")
    first, again = _ring(a, b, c), _ring(c, a, b)  # built in another order
    assert _owners(first) == _owners(again)
    for key in KEYS[:50]:
        order = first.order(key)
        assert sorted(r.name for r in order) == ["a", "b", "c"]
        assert [r.name for r in order] == [r.name for r in again.order(key)]


def test_adding_a_replica_moves_only_the_keys_it_takes() -> None:
    a, b, c, d = (Replica(name) for name in "abcd")
    before, after = _owners(_ring(a, b, c)), _owners(_ring(a, b, c, d))
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == "d" for _, new in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.35  # about a quarter


def test_removing_a_replica_moves_only_the_keys_it_held() -> None:
    a, b, c = (Replica(name) for name in "abc")
    before, after = _owners(_ring(a, b, c)), _owners(_ring(a, c))
    for old, new in zip(before, after, strict=True):
        assert old == new or old == "b"


def test_keys_are_shared_by_weight() -> None:
    counts = Counter(_owners(_ring(Replica("light", 1.0), Replica("heavy", 3.0))))
    assert abs(counts["heavy"] / len(KEYS) - 0.75) < 0.06, counts


def test_repeated_names_are_made_unique() -> None:
    assert ring_names(["x", "y", "x", "x#2"]) == ["x", "y", "x#2", "x#2#2"]
    with pytest.raises(ValueError, match="unique"):
        _ring(Replica("x"), Replica("x"))


# -- the key -------------------------------------------------------------------------------

def test_every_turn_of_a_conversation_has_its_first_turns_key() -> None:
    turns = _conversation("rust lifetimes", 5)
    keys = {affinity_key(_chat(messages), 1024) for messages in turns}
    assert len(keys) == 1
    other = {affinity_key(_chat(messages), 1024) for messages in _conversation("sql", 2)}
    assert keys.isdisjoint(other)


def test_the_key_holds_the_account_the_tools_and_a_text_prompts_head() -> None:
    messages = _conversation("go channels", 1)[0]
    one, other = affinity_key(_chat(messages), 1024), affinity_key(_chat(messages, "acct-2"),
                                                                   1024)
    assert one != other
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    assert affinity_key(_chat(messages, tools=[tool]), 1024) != one
    # only the head of a message counts: a long first message's tail does not move it
    long = [{"role": "user", "content": "x" * 2000 + "tail one"}]
    assert affinity_key(_chat(long), 1024) == affinity_key(
        _chat([{"role": "user", "content": "x" * 2000 + "tail two"}]), 1024)
    text = [_chat([], prompt=RawPrompt(text="def f():" + "y" * 1100 + tail))
            for tail in ("a", "b")]
    assert affinity_key(text[0], 1024) == affinity_key(text[1], 1024)
    assert affinity_key(text[0], 1024) != affinity_key(_chat([], prompt=RawPrompt("other")),
                                                       1024)


def test_another_accounts_identical_conversations_are_placed_on_their_own() -> None:
    affinity = _affinity(Replica("a"), Replica("b"))
    rng = random.Random(0)

    def placed(account: str) -> list[str]:
        names = []
        for i in range(32):
            request = _chat(_conversation(f"topic {i}", 1)[0], account)
            chosen = affinity.choose(affinity.ring.nodes, affinity.key(request), rng)
            assert chosen is not None
            names.append(chosen.name)
        return names
    assert placed("acct-1") == placed("acct-1")
    assert placed("acct-1") != placed("acct-2")


# -- bounded load and the choice -----------------------------------------------------------

def test_a_replica_above_its_share_passes_the_request_to_the_next() -> None:
    a, b = Replica("a"), Replica("b")
    weight, load = (lambda r: r.weight), (lambda r: r.active)
    a.active = 2  # with this request 3 of 3; bound ceil(1.5 * 3 / 2) = 3
    assert bounded_pick([a, b], {a, b}, weight, load, 0.5) is a
    a.active = 3  # 4 of 4 against a bound of 3
    assert bounded_pick([a, b], {a, b}, weight, load, 0.5) is b
    assert bounded_pick([a, b], {a, b}, weight, load, 0.0) is b
    b.active = 3  # both at 3: bound ceil(1.5 * 7 / 2) = 6
    assert bounded_pick([a, b], {a, b}, weight, load, 0.5) is a
    heavy, light = Replica("heavy", 3.0, active=6), Replica("light")
    # heavy: 7 of 7 with this one, within 1.5 x 3/4 of 7 (ceil 8)
    assert bounded_pick([heavy, light], {heavy, light}, weight, load, 0.5) is heavy
    assert bounded_pick([], set(), weight, load, 0.5) is None


def test_bounded_load_spreads_one_hot_key_over_the_replicas() -> None:
    replicas = [Replica(name) for name in "abcd"]
    affinity = _affinity(*replicas, epsilon=0.25)
    for _ in range(40):  # 40 requests of one conversation, none finishing
        chosen = affinity.choose(replicas, 12345, random.Random(0))
        assert chosen is not None
        chosen.active += 1
    order = affinity.ring.order(12345)
    loads = [r.active for r in order]
    # the ring's order is filled up to the bound, ceil(1.25 * 40 / 4) = 13 at the end
    assert max(loads) <= 13 and loads[0] == max(loads) and sum(loads[:3]) >= 36, loads


def test_only_candidates_are_chosen_and_the_next_on_the_ring_follows() -> None:
    replicas = [Replica(name) for name in "abc"]
    affinity = _affinity(*replicas)
    for key in KEYS[:100]:
        order = affinity.ring.order(key)
        assert affinity.choose(replicas, key, random.Random(0)) is order[0]
        # the first one's breaker open (or tried already): the next one on the ring
        assert affinity.choose([r for r in replicas if r is not order[0]], key,
                               random.Random(0)) is order[1]
    assert affinity.choose([], 1, random.Random(0)) is None


def test_replicas_off_the_ring_keep_their_weights_share() -> None:
    a, b, plain = Replica("a"), Replica("b"), Replica("hosted", weight=2.0)
    affinity = Affinity([("a", a), ("b", b)], lambda r: r.weight, lambda r: r.active, 0.5, 64)
    rng = random.Random(1)
    counts = Counter(affinity.choose([a, b, plain], 99, rng).name  # type: ignore[union-attr]
                     for _ in range(4000))
    ring_first = affinity.ring.order(99)[0].name
    assert set(counts) == {"hosted", ring_first}  # within the pool the ring decides
    assert abs(counts["hosted"] / 4000 - 0.5) < 0.05, counts


# -- configuration -------------------------------------------------------------------------

def test_which_deployments_keep_a_prefix_cache() -> None:
    url = "http://127.0.0.1:1/v1"
    assert keeps_prefix_cache(DeploymentConfig(base_url=url, profile="vllm"))
    assert keeps_prefix_cache(DeploymentConfig(base_url=url, profile="passthrough"))
    assert keeps_prefix_cache(DeploymentConfig(kind="local"))
    assert not keeps_prefix_cache(DeploymentConfig(base_url=url))
    assert not keeps_prefix_cache(DeploymentConfig(base_url=url, profile="vllm",
                                                   prefix_cache=False))
    assert keeps_prefix_cache(DeploymentConfig(base_url=url, prefix_cache=True))


def test_routed_models_use_affinity_only_with_two_cached_deployments() -> None:
    from modelyard.config import CatalogModelConfig
    from modelyard.providers.openai_compat import UpstreamDeployment

    def model(router: RouterConfig, *profiles: str) -> RoutedModel:
        configs = tuple(DeploymentConfig(base_url=f"http://127.0.0.1:{i + 1}/v1",
                                         profile=p, name=f"d{i}")  # type: ignore[arg-type]
                        for i, p in enumerate(profiles))
        return RoutedModel(CatalogModelConfig(id="m", deployments=configs), router,
                           [UpstreamDeployment(c, None) for c in configs])
    assert model(RouterConfig(), "vllm", "sglang", "openai").affinity is not None
    assert model(RouterConfig(), "vllm", "openai").affinity is None
    assert model(RouterConfig(affinity=False), "vllm", "vllm").affinity is None
