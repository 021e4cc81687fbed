"""The database reads behind the metrics: counts and sums per label, each one grouped
query."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.db.tables import proposals, scheduler_replicas, task_run_users, task_runs, webhook_outbox


class MetricsStore:
    def __init__(self, reads: AsyncEngine) -> None:
        self._reads = reads

    async def runs(self) -> list[tuple[str, str, int]]:
        """(task, status, runs)."""
        query = select(task_runs.c.task_name, task_runs.c.status, func.count()).group_by(
            task_runs.c.task_name, task_runs.c.status
        )
        async with self._reads.connect() as conn:
            return [(t, s, int(n)) for t, s, n in (await conn.execute(query)).all()]

    async def tokens(self) -> list[tuple[str, int, int]]:
        """(task, input tokens, output tokens) of its finished runs."""
        query = select(
            task_runs.c.task_name,
            func.coalesce(func.sum(task_runs.c.input_tokens), 0),
            func.coalesce(func.sum(task_runs.c.output_tokens), 0),
        ).group_by(task_runs.c.task_name)
        async with self._reads.connect() as conn:
            return [(t, int(i), int(o)) for t, i, o in (await conn.execute(query)).all()]

    async def recent_users(self, since: datetime) -> list[tuple[str, str, int]]:
        """(task, status, users) over the runs created since `since`."""
        query = (
            select(task_runs.c.task_name, task_run_users.c.status, func.count())
            .select_from(task_runs.join(task_run_users, task_run_users.c.run_id == task_runs.c.id))
            .where(task_runs.c.created_at >= since)
            .group_by(task_runs.c.task_name, task_run_users.c.status)
        )
        async with self._reads.connect() as conn:
            return [(t, s, int(n)) for t, s, n in (await conn.execute(query)).all()]

    async def proposals(self) -> list[tuple[str, int]]:
        """(status, proposals)."""
        query = select(proposals.c.status, func.count()).group_by(proposals.c.status)
        async with self._reads.connect() as conn:
            return [(s, int(n)) for s, n in (await conn.execute(query)).all()]

    async def webhook_events(self) -> list[tuple[str, int]]:
        """(status, webhook events in the outbox): pending, delivered (kept 7 days), failed."""
        query = select(webhook_outbox.c.status, func.count()).group_by(webhook_outbox.c.status)
        async with self._reads.connect() as conn:
            return [(s, int(n)) for s, n in (await conn.execute(query)).all()]

    async def replicas(self, since: datetime) -> list[tuple[str, datetime | None]]:
        """(replica, last tick) of the replicas that heart-beat since `since`."""
        query = select(scheduler_replicas.c.replica_id, scheduler_replicas.c.last_tick_at).where(
            scheduler_replicas.c.heartbeat_at >= since
        )
        async with self._reads.connect() as conn:
            return [(r, t) for r, t in (await conn.execute(query)).all()]
