"""Weighted fair share of the engine between accounts: who gets the next free slot and the
next prefill chunk (the scheduler asks; this class keeps the waiting queues and the counts).

Every sequence carries a `Share`: its account (the key), the account's weight, and its API
key's priority. Each account has its own queue of waiting sequences, ordered by priority,
then by arrival (first come, first served within an account), and a virtual service: the
tokens the engine spent on it, divided by its weight. Each step charges an account one token
per slot it holds and every prompt token read for it. The next prefill chunk and the next
free slot go to the account with the least virtual service (ties: the one holding fewer
slots, then the earlier arrival), so under sustained load each account's share of slots and
of prefill tokens goes to its weight, and a light account's request is admitted at the next
free slot, ahead of a heavy account's backlog. This is start-time fair queuing with the
charges of the virtual token counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024), with prefill read in chunks.

An idle account banks no credit: when one becomes active (a sequence queued while it has
none waiting or running) its service is raised to the least of the active accounts'. When
no account is active, every count is forgotten. Running sequences are never preempted: the
share acts only on admissions and prefill chunks. `light` and `heavy` name the accounts
holding fewer and more slots than their weight's share; the scheduler gives the light
ones steps of their own and may pause the heavy ones' decoding for such a step.

With `fair` off every sequence is in one queue, first come, first served.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from modelyard.engine.sequence import Sequence

SLOT_STEP_COST = 1.0
"""Tokens charged per step for each slot an account holds (a decode token costs as much)."""
MIN_WEIGHT = 1e-3
RESERVE_MEMORY_STEPS = 1024
"""How many steps after an account last had work its reserved slots stay kept for it."""

Flow = str | None
"""An account's key; None is the common share of sequences that name none."""


class FairQueue:
    """The waiting sequences, one queue per account, and each account's virtual service.

    Iterating, `len`, `in` and indexing see every waiting sequence in arrival order."""

    def __init__(self, fair: bool = True) -> None:
        self.fair = fair
        self._tickets: dict[Sequence, int] = {}
        """Waiting sequences, in arrival order, with their arrival number."""
        self._next_ticket = 0
        self._flows: dict[Flow, list[Sequence]] = {}
        """Each account's waiting sequences in the order they are to be admitted."""
        self.service: dict[Flow, float] = {}
        """Tokens spent on each account, divided by its weight."""
        self.weights: dict[Flow, float] = {}
        self.held: dict[Flow, int] = {}
        """Slots each account holds (its running sequences)."""
        self.step = 0
        self.last_active: dict[Flow, int] = {}
        """The last step at which each account had work (waiting or running)."""

    def key(self, seq: Sequence) -> Flow:
        return seq.share.key if self.fair else None

    # -- the waiting sequences, in arrival order ---------------------------------------------

    def __len__(self) -> int:
        return len(self._tickets)

    def __bool__(self) -> bool:
        return bool(self._tickets)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(list(self._tickets))

    def __contains__(self, seq: object) -> bool:
        return seq in self._tickets

    def __getitem__(self, index: int) -> Sequence:
        if index < 0:
            index += len(self._tickets)
        for seq in itertools.islice(self._tickets, index, None):
            return seq
        raise IndexError(index)

    def queue(self, flow: Flow) -> list[Sequence]:
        """An account's waiting sequences, in the order they are to be admitted."""
        return list(self._flows.get(flow, ()))

    def heads(self, limit: int) -> dict[Flow, deque[Sequence]]:
        """The first `limit` waiting sequences of each account that has some."""
        return {flow: deque(queue[:limit]) for flow, queue in self._flows.items()}

    # -- changes ----------------------------------------------------------------------------

    def push(self, seq: Sequence) -> None:
        flow = self.key(seq)
        if not self._active(flow):
            self._lift(flow)
        if self.fair:
            self.weights[flow] = max(seq.share.weight, MIN_WEIGHT)
        self._tickets[seq] = self._next_ticket
        self._next_ticket += 1
        bisect.insort(self._flows.setdefault(flow, []), seq, key=self._rank)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the waiting queues (admitted or aborted)."""
        flow = self.key(seq)
        queue = self._flows[flow]
        queue.remove(seq)
        if not queue:
            del self._flows[flow]
        del self._tickets[seq]

    def started(self, seq: Sequence) -> None:
        """A sequence (taken out of the queues) holds a slot now."""
        flow = self.key(seq)
        self.held[flow] = self.held.get(flow, 0) + 1

    def ended(self, seq: Sequence) -> None:
        """A running sequence gave its slot back."""
        flow = self.key(seq)
        left = self.held.get(flow, 0) - 1
        if left > 0:
            self.held[flow] = left
        else:
            self.held.pop(flow, None)

    def charge(self, seq: Sequence, tokens: float) -> None:
        flow = self.key(seq)
        self.service[flow] = self.service.get(flow, 0.0) + tokens / self.weights.get(flow, 1.0)

    def tick(self) -> None:
        """A step begins: note who has work now, forget who has had none for long."""
        self.step += 1
        for flow in {*self._flows, *self.held}:
            self.last_active[flow] = self.step
        if len(self.last_active) > 2 * (len(self._flows) + len(self.held)) + 16:
            horizon = self.step - RESERVE_MEMORY_STEPS
            self.last_active = {f: s for f, s in self.last_active.items() if s >= horizon}

    def others_active_lately(self, flow: Flow) -> bool:
        """Whether an account other than `flow` had work within RESERVE_MEMORY_STEPS."""
        horizon = self.step - RESERVE_MEMORY_STEPS
        return any(step >= horizon for other, step in self.last_active.items()
                   if other != flow)

    def fair_slots(self, flow: Flow, slots: int, *, lately: bool = False) -> float:
        """The slots `flow` would hold if the active accounts (and `flow`; with `lately`,
        also those that had work within RESERVE_MEMORY_STEPS) held `slots` in proportion
        to their weights."""
        active = {*self._flows, *self.held, flow}
        if lately:
            horizon = self.step - RESERVE_MEMORY_STEPS
            active.update(f for f, step in self.last_active.items() if step >= horizon)
        total = sum(self.weights.get(f, 1.0) for f in active)
        return slots * self.weights.get(flow, 1.0) / total

    def light(self, slots: int) -> set[Flow]:
        """The accounts holding fewer than their share of `slots` while another account
        is active: their prompts are read in steps of their own (see the scheduler)."""
        active = {*self._flows, *self.held}
        if not self.fair or len(active) < 2:
            return set()
        return {f for f in active if self.held.get(f, 0) < self.fair_slots(f, slots)}

    def interrupt_rule(self, slots: int, served: frozenset[Flow],
                       reading: frozenset[Flow]) -> InterruptRule | None:
        """A snapshot of the shares for `InterruptRule`, for a step that serves the
        accounts `served` and reads prompts of `reading`; None without fair share."""
        if not self.fair:
            return None
        return InterruptRule(dict(self.held), dict(self.weights),
                             frozenset({*self._flows, *self.held}), served, reading, slots)

    def restore_service(self, service: Mapping[Flow, float]) -> None:
        """Take back the charges made since `service` was copied (a step that did not run)."""
        self.service = dict(service)

    def heavy(self, slots: int) -> set[Flow]:
        """The accounts holding more than their share of `slots`."""
        if not self.fair:
            return set()
        return {f for f in self.held if self.held[f] > self.fair_slots(f, slots)}

    # -- whose turn ---------------------------------------------------------------------------

    def turn(self, flow: Flow) -> tuple[float, int, int]:
        """Sorts accounts by whose turn it is: least service, then fewest slots held, then
        the earliest waiting sequence (-1 for an account with none waiting)."""
        queue = self._flows.get(flow)
        first = self._tickets[queue[0]] if queue else -1
        return self.service.get(flow, 0.0), self.held.get(flow, 0), first

    def _rank(self, seq: Sequence) -> tuple[int, int]:
        priority = seq.share.priority if self.fair else 0
        return -priority, self._tickets[seq]

    def _active(self, flow: Flow) -> bool:
        return flow in self._flows or flow in self.held

    def _lift(self, flow: Flow) -> None:
        """An account becomes active: no credit for the time it was idle."""
        active = [self.service.get(f, 0.0) for f in {*self._flows, *self.held}]
        if not active:
            self.service.clear()
            self.weights.clear()
            return
        floor = min(active)
        # Idle accounts at or below the floor would be raised to it anyway: forget them.
        for idle in [f for f, s in self.service.items() if s <= floor and not self._active(f)]:
            del self.service[idle]
            self.weights.pop(idle, None)
        self.service[flow] = max(self.service.get(flow, 0.0), floor)


@dataclass(frozen=True)
class InterruptRule:
    """Whose new request may interrupt the step in flight (the engine asks from the event
    loop while the step runs, so this is a snapshot, not the live queue): an account that
    would hold fewer than its weight's share of the slots once its request counts (a
    light one), when the step serves an account at or above its share and reads none of
    the newcomer's prompts. The step is then stopped and done again after a step that
    starts the light request (scheduler.py)."""

    held: dict[Flow, int]
    weights: dict[Flow, float]
    active: frozenset[Flow]
    served: frozenset[Flow]
    """Accounts with a chunk in the step."""
    reading: frozenset[Flow]
    """Accounts whose prompt the step reads."""
    slots: int

    def interrupts_for(self, flow: Flow, weight: float) -> bool:
        if flow in self.reading:
            return False
        active = self.active | {flow}
        if len(active) < 2:
            return False
        weights = {f: self.weights.get(f, 1.0) for f in active}
        weights[flow] = max(weight, MIN_WEIGHT)
        total = sum(weights.values())

        def at_share(f: Flow) -> bool:
            return self.held.get(f, 0) >= self.slots * weights[f] / total

        return not at_share(flow) and any(at_share(f) for f in self.served if f != flow)
