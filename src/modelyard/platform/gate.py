"""The Gate interface: the platform's checkpoints on a request's path.

The HTTP layer asks the gate, in order: who is calling (`authenticate`), may this request
come in at all (`check_in`, before its body is read: the key's request rate and its and its
account's requests in flight), may they use this model (`may_use`), may it run and at what
maximum cost (`admit`: the token rate, then a balance reservation, from upper bounds of the
prompt and completion that cost nothing to compute), and, after the response or its
failure, what it really cost (`settle`) and that it is over (`check_out`, exactly once per
ticket, whether or not the request was admitted). `OpenGate` is the embedded default with
no keys or money; the accounts-backed gate plugs in behind the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from modelyard.errors import Refusal
from modelyard.platform.money import FREE, Price
from modelyard.usage import Usage

__all__ = ["Admission", "Caller", "Gate", "OpenGate", "Outcome", "PlatformError", "Ticket",
           "Usage"]


class PlatformError(Refusal):
    """A refusal in SPEC.md's terms: 401, 402, 404, 429 (with headers)."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key and its account (None for the open gate)."""

    key_id: str | None = None
    account_id: str | None = None
    is_admin: bool = False
    allowed_models: frozenset[str] | None = None
    """None: every model."""
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    """The key's own limit of requests in flight (None: the gate's default)."""
    weight: float = 1.0
    """The account's weight in the fair share of a built-in engine's slots and prefill."""
    priority: int = 0
    """The key's priority among its account's requests waiting for an engine (higher
    first); the account's share stays the same."""


@dataclass
class Ticket:
    """A request let in before its body is read (`check_in`): what it holds of its key's
    limits until `check_out`."""

    caller: Caller
    headers: dict[str, str] = field(default_factory=dict)
    """x-ratelimit-* headers of the request rate."""
    slot: Any = None
    """The gate's hold on the request's place in flight, if any."""
    checked_out: bool = False


@dataclass(frozen=True)
class Admission:
    """A request allowed to run: its reservation and the headers to send back."""

    caller: Caller
    model: str
    reservation_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    reserved: int = 0
    """The maximum cost held, in micro-units."""
    max_tokens: int = 0
    prompt_tokens: int = 0
    """The prompt's upper bound the token rate was charged for."""


@dataclass(frozen=True)
class Outcome:
    """How a request ended, for the bill and the usage record."""

    usage: Usage
    status: int
    """HTTP status the request ended with: the response's, 200 for a stream whose client
    went away, the status of the error event that ended a stream, 499 when the client went
    away before a non-streamed answer was sent."""
    latency_s: float
    ttft_s: float | None = None
    user: str | None = None
    client_disconnected: bool = False


class Gate(ABC):
    @abstractmethod
    async def authenticate(self, authorization: str | None) -> Caller:
        """Resolve the Authorization header to a caller, or raise PlatformError(401)."""

    def may_use(self, caller: Caller, model: str) -> bool:
        return caller.allowed_models is None or model in caller.allowed_models

    def price(self, model: str) -> Price:
        """What the model costs (the price table's entry; a model without one is free)."""
        return FREE

    async def check_in(self, caller: Caller) -> Ticket:
        """Before the body is read: the request rate and the requests in flight (429)."""
        return Ticket(caller)

    async def check_out(self, ticket: Ticket) -> None:
        """The request is over (answered, refused or abandoned); idempotent."""
        ticket.checked_out = True

    @abstractmethod
    async def admit(self, ticket: Ticket, model: str, prompt_tokens: int,
                    max_tokens: int) -> Admission:
        """Apply the token rate (429) and reserve the maximum cost (402), or raise.
        `prompt_tokens` and `max_tokens` are upper bounds (all choices together)."""

    @abstractmethod
    async def settle(self, admission: Admission, outcome: Outcome) -> None:
        """Charge the real cost, release the rest of the reservation, record the usage."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (called once the server's event loop runs)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections at shutdown."""


class OpenGate(Gate):
    """No accounts: any non-empty Bearer key is accepted and nothing is charged."""

    async def authenticate(self, authorization: str | None) -> Caller:
        if authorization is None or not authorization[:7].lower() == "bearer " or not (
            authorization[7:].strip()
        ):
            raise PlatformError(401, "missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        return Caller()

    async def admit(self, ticket: Ticket, model: str, prompt_tokens: int,
                    max_tokens: int) -> Admission:
        return Admission(ticket.caller, model)

    async def settle(self, admission: Admission, outcome: Outcome) -> None:
        return None
