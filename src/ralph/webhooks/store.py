"""Webhook events: recorded in the transaction of the change they report, delivered later.

A change and its event commit together (a transactional outbox): an event is never sent for
a change that rolled back, nor lost to a crash right after the change committed. The
`WebhookSender` delivers what the outbox holds (`OutboxStore`), at least once, each event
under its id. This module is the only writer of `webhook_outbox`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.db.tables import webhook_outbox

RUN_FINISHED = "run.finished"
PROPOSALS_PENDING = "proposals.pending"
PROPOSAL_DECIDED = "proposal.decided"


class Outbox:
    """Where the stores record events. Disabled (records nothing) without a webhook URL."""

    def __init__(self, *, enabled: bool, console_url: str = "/console") -> None:
        self.enabled = enabled
        self._console_url = console_url.rstrip("/")
        self._listeners: list[Callable[[], None]] = []

    def console_link(self, run_id: str) -> str:
        """Where a person reviews what the run proposed."""
        return f"{self._console_url}?run_id={run_id}"

    async def add(
        self, conn: AsyncConnection, event_type: str, data: dict[str, Any], now: datetime
    ) -> None:
        """Record an event in `conn`'s transaction: it exists if and only if that commits."""
        if not self.enabled:
            return
        event_id = str(uuid.uuid4())
        body = json.dumps(
            {"id": event_id, "type": event_type, "created_at": now.isoformat(), "data": data},
            separators=(",", ":"),
            default=str,
        )
        await conn.execute(
            insert(webhook_outbox).values(
                id=event_id,
                event_type=event_type,
                body=body,
                created_at=now,
                status="pending",
                attempts=0,
                next_attempt_at=now,
            )
        )

    def on_added(self, listener: Callable[[], None]) -> None:
        """Call `listener` when a store of this process committed events (a sender wakes)."""
        self._listeners.append(listener)

    def added(self) -> None:
        """A store committed events: tell the listeners. Call after the commit."""
        if self.enabled:
            for listener in self._listeners:
                listener()


@dataclass(frozen=True, slots=True)
class DueEvent:
    id: str
    event_type: str
    body: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime


class OutboxStore:
    """The sender's side of the outbox: due events, claims, outcomes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def next_due(self) -> datetime | None:
        """When the earliest pending event is due (indexed)."""
        query = select(func.min(webhook_outbox.c.next_attempt_at)).where(
            webhook_outbox.c.status == "pending"
        )
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def due(self, now: datetime, limit: int) -> list[DueEvent]:
        """Pending events due at `now`, oldest first."""
        query = (
            select(
                webhook_outbox.c.id,
                webhook_outbox.c.event_type,
                webhook_outbox.c.body,
                webhook_outbox.c.attempts,
                webhook_outbox.c.created_at,
                webhook_outbox.c.next_attempt_at,
            )
            .where(webhook_outbox.c.status == "pending", webhook_outbox.c.next_attempt_at <= now)
            .order_by(webhook_outbox.c.next_attempt_at, webhook_outbox.c.created_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [DueEvent(*row) for row in await conn.execute(query)]

    async def claim(self, event_id: str, seen: datetime, until: datetime) -> bool:
        """Take the event until `until`, if nobody moved it since it was read as due at `seen`."""
        claim = (
            update(webhook_outbox)
            .where(
                webhook_outbox.c.id == event_id,
                webhook_outbox.c.status == "pending",
                webhook_outbox.c.next_attempt_at == seen,
            )
            .values(next_attempt_at=until)
        )
        async with self._engine.begin() as conn:
            return (await conn.execute(claim)).rowcount == 1

    async def delivered(self, event_id: str, attempts: int, now: datetime) -> None:
        await self._update(event_id, status="delivered", delivered_at=now, attempts=attempts)

    async def failed(
        self, event_id: str, attempts: int, error: str, retry_at: datetime, give_up: bool
    ) -> None:
        """A failed attempt: try again at `retry_at`, or end `failed` if `give_up`."""
        await self._update(
            event_id,
            status="failed" if give_up else "pending",
            attempts=attempts,
            next_attempt_at=retry_at,
            last_error=error,
        )

    async def _update(self, event_id: str, **values: object) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(webhook_outbox).where(webhook_outbox.c.id == event_id).values(**values)
            )

    async def forget_delivered(self, before: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(webhook_outbox).where(
                    webhook_outbox.c.status == "delivered", webhook_outbox.c.delivered_at < before
                )
            )
