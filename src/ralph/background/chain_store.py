"""SQL of task chains (`after` triggers): the upstream task's results not followed yet, the
claims that follow them (once per (task, upstream run, user) across replicas), and what the
upstream unit did, for the following task's agent."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.background.models import TaskDefinition, TriggerType
from ralph.background.run_store import RERUN_PREFIX, RunStore
from ralph.background.task_store import TaskStore
from ralph.db.engine import insert_ignore, one_statement
from ralph.db.tables import (
    task_chain_claims,
    task_run_users,
    task_runs,
    task_users,
)

# how far an upstream chain of reruns and retries is followed back to the run that was claimed
_MAX_HOPS = 5


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    """An upstream unit's end that the following task has not claimed."""

    run_id: str
    user_id: str
    completed_at: datetime


@dataclass(frozen=True, slots=True)
class UpstreamOutcome:
    """What the upstream task did for the user, as its run recorded it."""

    task_name: str
    run_id: str
    status: str
    answer: str | None


def _final_answer(transcript: str | None) -> str | None:
    """The agent's last text answer in a stored transcript (None: none)."""
    try:
        entries = json.loads(transcript or "[]")
    except ValueError:
        return None
    if not isinstance(entries, list):
        return None
    for entry in reversed(cast(list[object], entries)):
        if not isinstance(entry, dict):
            continue
        fields = cast(dict[str, object], entry)
        content = fields.get("content")
        if fields.get("role") == "assistant" and isinstance(content, str) and content.strip():
            return content.strip()
    return None


class ChainStore:
    def __init__(self, engine: AsyncEngine, runs: RunStore, reads: AsyncEngine | None = None):
        self._engine = engine
        self._runs = runs
        self._reads = reads or engine

    async def pending(
        self, task_name: str, upstream: str, on: Sequence[str], since: datetime
    ) -> list[UpstreamResult]:
        """The results of task `upstream` for users of `task_name`'s list that `task_name`
        has not claimed: units that ended in one of `on` at or after `since`, in runs that
        are not dry runs; oldest first."""
        runs = select(task_runs.c.id).where(
            task_runs.c.task_name == upstream,
            task_runs.c.dry_run.is_(False),
            # a run that ended before `since` holds no unit that ended after it
            (task_runs.c.completed_at.is_(None)) | (task_runs.c.completed_at >= since),
        )
        claims = task_chain_claims.c
        query = (
            select(task_run_users.c.run_id, task_run_users.c.user_id, task_run_users.c.completed_at)
            .join(
                task_users,
                and_(
                    task_users.c.task_name == task_name,
                    task_users.c.user_id == task_run_users.c.user_id,
                ),
            )
            .outerjoin(
                task_chain_claims,
                and_(
                    claims.task_name == task_name,
                    claims.upstream_run_id == task_run_users.c.run_id,
                    claims.user_id == task_run_users.c.user_id,
                ),
            )
            .where(
                task_run_users.c.run_id.in_(runs),
                task_run_users.c.status.in_(list(on)),
                task_run_users.c.completed_at >= since,
                claims.run_id.is_(None),
            )
            .order_by(task_run_users.c.completed_at, task_run_users.c.position)
        )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [UpstreamResult(r.run_id, r.user_id, r.completed_at) for r in rows]

    async def fire(
        self, task: TaskDefinition, results: Sequence[UpstreamResult], now: datetime
    ) -> tuple[str | None, list[str]]:
        """Claim `results` for `task` and create one run of the users claimed, in one
        transaction: a crash loses neither. Returns the run id (None: another replica claimed
        them all) and the users claimed (a user whose two upstream runs ended is run once)."""
        run_id = str(uuid.uuid4())
        async with self._engine.begin() as conn:
            await conn.execute(
                insert_ignore(self._engine, task_chain_claims),
                [
                    {
                        "task_name": task.name,
                        "upstream_run_id": r.run_id,
                        "user_id": r.user_id,
                        "run_id": run_id,
                        "claimed_at": now,
                    }
                    for r in results
                ],
            )
            query = select(task_chain_claims.c.user_id).where(task_chain_claims.c.run_id == run_id)
            won = set((await conn.execute(query)).scalars().all())
            users = list(dict.fromkeys(r.user_id for r in results if r.user_id in won))
            if not users:
                return None, []
            await self._runs.create_in(conn, task, TriggerType.AFTER, users, now, run_id=run_id)
        return run_id, users

    async def last_fired(self, task_name: str) -> datetime | None:
        """When the task's newest `after` run was created (by any replica)."""
        query = select(func.max(task_runs.c.created_at)).where(
            task_runs.c.task_name == task_name,
            task_runs.c.trigger_type == TriggerType.AFTER.value,
        )
        async with self._reads.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def watermark(self, task_name: str) -> datetime | None:
        async with one_statement(self._reads) as conn:
            return await TaskStore.watermark_in(conn, task_name)

    async def save_watermark(self, task_name: str, at: datetime) -> None:
        """The upstream results ended before `at` have all been followed (or were not due)."""
        async with self._engine.begin() as conn:
            await TaskStore.advance_watermark_in(conn, task_name, at)

    async def _claimed_run(self, run_id: str) -> str:
        """The run whose claims `run_id` carries out: itself, or the run it is a rerun or a
        retry of (followed back a few times)."""
        async with self._reads.connect() as conn:
            for _ in range(_MAX_HOPS):
                claimed = (
                    await conn.execute(
                        select(task_chain_claims.c.run_id)
                        .where(task_chain_claims.c.run_id == run_id)
                        .limit(1)
                    )
                ).scalar()
                if claimed is not None:
                    return run_id
                row = (
                    await conn.execute(
                        select(task_runs.c.slot_key, task_runs.c.retry_of).where(
                            task_runs.c.id == run_id
                        )
                    )
                ).first()
                if row is None:
                    break
                slot_key: str | None = row.slot_key
                if row.retry_of:
                    run_id = row.retry_of
                elif slot_key and slot_key.startswith(RERUN_PREFIX):
                    run_id = slot_key.removeprefix(RERUN_PREFIX)
                else:
                    break
        return run_id

    async def upstream_runs(self, run_id: str) -> list[str]:
        """The upstream runs whose results started this run (of an `after` task)."""
        claimed = await self._claimed_run(run_id)
        query = (
            select(task_chain_claims.c.upstream_run_id)
            .where(task_chain_claims.c.run_id == claimed)
            .distinct()
        )
        async with self._reads.connect() as conn:
            return sorted((await conn.execute(query)).scalars().all())

    async def upstream_outcomes(self, run_id: str, user_id: str) -> list[UpstreamOutcome]:
        """What the upstream task's units ended in for the user, in the runs this run follows
        (their proposals are the memory store's)."""
        claimed = await self._claimed_run(run_id)
        query = (
            select(
                task_runs.c.task_name,
                task_run_users.c.run_id,
                task_run_users.c.status,
                task_run_users.c.transcript,
            )
            .join(task_runs, task_runs.c.id == task_run_users.c.run_id)
            .join(
                task_chain_claims,
                and_(
                    task_chain_claims.c.upstream_run_id == task_run_users.c.run_id,
                    task_chain_claims.c.user_id == task_run_users.c.user_id,
                ),
            )
            .where(task_chain_claims.c.run_id == claimed, task_run_users.c.user_id == user_id)
            .order_by(task_run_users.c.completed_at)
        )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            UpstreamOutcome(r.task_name, r.run_id, r.status, _final_answer(r.transcript))
            for r in rows
        ]
