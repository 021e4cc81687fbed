"""What one agent run's model calls add up to, beyond what Agno counts: time spent waiting
for the shared rate limit, and what the provider charged. The agent runner sets a record
around one user's agent; the model calls inside it add to it."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class CallRecord:
    wait_seconds: float = 0.0
    # moves the agent's deadline by the time spent waiting for the limit
    extend: Callable[[float], None] | None = None
    # USD, as the provider reports it (None: it reported no cost)
    cost_usd: float | None = None
    # each HTTP request to the provider: how long it took to answer (seconds)
    call_seconds: list[float] = field(default_factory=list[float])
    rate_limited: int = 0  # replies with status 429
    retries: int = 0  # requests beyond the first of each call
    # what kind of failure the provider's last failed call was (an EndReason's value)
    failure: str | None = None
    # seconds the provider's last failed call asked to wait (its Retry-After), if it said
    retry_after: float | None = None

    def waited(self, seconds: float) -> None:
        self.wait_seconds += seconds
        if self.extend is not None:
            self.extend(seconds)

    def charged(self, usd: float) -> None:
        self.cost_usd = (self.cost_usd or 0.0) + usd


current_call: ContextVar[CallRecord | None] = ContextVar("ralph_current_call", default=None)
