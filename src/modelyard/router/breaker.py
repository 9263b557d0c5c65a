"""A passive circuit breaker: a pure state machine over the outcomes of real requests.

closed: requests flow; `failures` consecutive failures open it.
open: no requests until `cooldown` seconds have passed; then one probe is let through
(half-open). The probe's success closes the breaker, its failure opens it again.
Time is passed in, so the breaker is tested without clocks or network.
"""

from __future__ import annotations

from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass
class Breaker:
    failures: int = 5
    cooldown: float = 30.0
    state: str = CLOSED
    consecutive: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def available(self, now: float) -> bool:
        """Whether a request may be sent now (without claiming the half-open probe)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self.opened_at + self.cooldown
        return not self.probing

    def acquire(self, now: float) -> bool:
        """Claim the right to send one request; in half-open only one probe at a time."""
        if not self.available(now):
            return False
        if self.state != CLOSED:
            self.state = HALF_OPEN
            self.probing = True
        return True

    def success(self) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self.probing = False

    def failure(self, now: float) -> None:
        self.consecutive += 1
        if self.state == HALF_OPEN or self.consecutive >= self.failures:
            self.state = OPEN
            self.opened_at = now
        self.probing = False

    def release(self) -> None:
        """A request ended with no verdict (the client went away before the first byte)."""
        self.probing = False

    def retry_after(self, now: float) -> float:
        """Seconds until this breaker lets a request through again (0 if it does now)."""
        return 0.0 if self.available(now) else max(0.0, self.opened_at + self.cooldown - now)
