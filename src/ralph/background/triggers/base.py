"""What every trigger kind answers, and the values it answers with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from ralph.background.models import StoredTask


@dataclass(frozen=True, slots=True)
class Fired:
    """What one pass over a task started (run ids, to be started), and when to look at it
    next (None: never on its own: `error` says why, and a change to the task wakes the
    loop)."""

    run_ids: list[str]
    next_check: datetime | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Fire:
    at: datetime
    timezone: str
    users: int


@dataclass(frozen=True, slots=True)
class Upcoming:
    """What a task does next: cron fire times, an idle task's armed users, or the users
    waiting for a task that follows another."""

    name: str
    trigger_type: str
    enabled: bool
    fires: list[Fire] = field(default_factory=list[Fire])
    armed_users: int | None = None
    next_due_at: datetime | None = None
    follows: str | None = None
    waiting_users: int | None = None


@dataclass(frozen=True, slots=True)
class NextFire:
    """When a task fires next as far as its trigger knows (None: on an event, or never, with
    `error` saying why)."""

    at: datetime | None
    error: str | None = None


class TriggerKind(Protocol):
    """One kind of trigger, as the scheduler and the service use it."""

    def begin_pass(self, tasks: Sequence[StoredTask]) -> None:
        """A scheduler pass starts over these enabled tasks (of every kind: one may need to
        know of others, as `after` of the tasks it follows)."""
        ...

    async def fire(self, stored: StoredTask, now: datetime) -> Fired:
        """Claim and create the runs due now for the task (each claim true for one caller
        across replicas)."""
        ...

    async def upcoming(self, stored: StoredTask, now: datetime, limit: int) -> Upcoming: ...

    async def next_fire(self, stored: StoredTask, now: datetime) -> NextFire: ...
