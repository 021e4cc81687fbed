"""SQL state of the scheduler: cron slots taken, idle episodes, run leases, replicas."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.background.models import RunStatus, TaskDefinition, TriggerType, UserStatus
from ralph.background.store import RunStore
from ralph.db.engine import insert_ignore, upsert
from ralph.db.tables import (
    background_tasks,
    idle_deferred,
    idle_state,
    scheduler_replicas,
    task_run_users,
    task_runs,
    task_user_locks,
    task_users,
    user_activity,
)


@dataclass(frozen=True, slots=True)
class IdleCandidate:
    """A task user whose last message is old enough, with the task's idle state for them."""

    user_id: str
    last_message_at: datetime
    episode_message_at: datetime | None
    last_run_at: datetime | None


class ScheduleStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._defer = upsert(engine, idle_deferred, lambda p: {"due_at": p.due_at})
        self._replica = upsert(
            engine,
            scheduler_replicas,
            lambda p: {"heartbeat_at": p.heartbeat_at, "last_tick_at": p.last_tick_at},
        )

    # --- cron -----------------------------------------------------------------------------

    async def last_cron_slot(self, task_name: str) -> datetime | None:
        """The newest slot recorded for the task (run or missed), if any."""
        query = (
            select(task_runs.c.slot_at)
            .where(
                task_runs.c.task_name == task_name,
                task_runs.c.trigger_type == TriggerType.CRON.value,
                task_runs.c.slot_at.is_not(None),
            )
            .order_by(task_runs.c.slot_at.desc())
            .limit(1)
        )
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    # --- idle -----------------------------------------------------------------------------

    async def idle_candidates(
        self, task_name: str, idle_cutoff: datetime, now: datetime
    ) -> tuple[list[IdleCandidate], datetime | None]:
        """Users of the task whose last message is at or before `idle_cutoff` and after the
        task's watermark, plus deferred users due by `now`; and the watermark itself.

        Reads an index range on `last_message_at` after the watermark, so the cost follows the
        number of users becoming idle, not the size of the activity table. With no watermark
        (new or replaced task) every idle user of the task is read, once.
        """
        columns = (
            user_activity.c.user_id,
            user_activity.c.last_message_at,
            idle_state.c.episode_message_at,
            idle_state.c.last_run_at,
        )
        state = and_(
            idle_state.c.task_name == task_name, idle_state.c.user_id == user_activity.c.user_id
        )
        window = (
            select(*columns)
            .select_from(
                user_activity.join(
                    task_users,
                    and_(
                        task_users.c.task_name == task_name,
                        task_users.c.user_id == user_activity.c.user_id,
                    ),
                ).outerjoin(idle_state, state)
            )
            .where(user_activity.c.last_message_at <= idle_cutoff)
        )
        deferred = (
            select(*columns)
            .select_from(
                idle_deferred.join(
                    user_activity, user_activity.c.user_id == idle_deferred.c.user_id
                ).outerjoin(idle_state, state)
            )
            .where(idle_deferred.c.task_name == task_name, idle_deferred.c.due_at <= now)
        )
        watermark_query = select(background_tasks.c.idle_watermark).where(
            background_tasks.c.name == task_name
        )
        async with self._engine.connect() as conn:
            watermark = (await conn.execute(watermark_query)).scalar()
            if watermark is not None:
                window = window.where(user_activity.c.last_message_at > watermark)
            rows = [*(await conn.execute(window)).all(), *(await conn.execute(deferred)).all()]
        return [IdleCandidate(*row) for row in rows], watermark

    async def fire_idle(
        self,
        runs: RunStore,
        task: TaskDefinition,
        due: Sequence[tuple[str, datetime]],
        now: datetime,
        cooldown_cutoff: datetime,
    ) -> tuple[str | None, list[str]]:
        """Claim the idle episodes of `due` (user, message ending the episode) and create one
        idle run for the users claimed, in one transaction: a crash loses neither a claim nor
        a run. Returns the run id (None if nothing was claimed) and the users claimed.

        Each claim is true for exactly one caller across all processes: it is a write
        conditional on the stored episode being older and the last run being before
        `cooldown_cutoff`, or for a first episode an insert that only one caller can make.
        """
        async with self._engine.begin() as conn:
            claimed = [
                user_id
                for user_id, message_at in due
                if await self._claim(conn, task.name, user_id, message_at, now, cooldown_cutoff)
            ]
            if not claimed:
                return None, []
            run_id = await runs.create_in(conn, task, TriggerType.IDLE, claimed, now)
        return run_id, claimed

    async def _claim(
        self,
        conn: AsyncConnection,
        task_name: str,
        user_id: str,
        message_at: datetime,
        now: datetime,
        cooldown_cutoff: datetime,
    ) -> bool:
        updated = await conn.execute(
            update(idle_state)
            .where(
                idle_state.c.task_name == task_name,
                idle_state.c.user_id == user_id,
                idle_state.c.episode_message_at < message_at,
                idle_state.c.last_run_at <= cooldown_cutoff,
            )
            .values(episode_message_at=message_at, last_run_at=now)
        )
        if updated.rowcount == 1:
            return True
        inserted = await conn.execute(
            insert_ignore(self._engine, idle_state).values(
                task_name=task_name,
                user_id=user_id,
                episode_message_at=message_at,
                last_run_at=now,
            )
        )
        return inserted.rowcount == 1

    async def save_idle_progress(
        self,
        task_name: str,
        now: datetime,
        held: Sequence[tuple[str, datetime]],
        watermark: datetime,
    ) -> None:
        """Replace the deferred users due by `now` with `held` (user, due time), and move the
        watermark forward (never back, whichever replica writes last)."""
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(idle_deferred).where(
                    idle_deferred.c.task_name == task_name, idle_deferred.c.due_at <= now
                )
            )
            for user_id, due_at in held:
                await conn.execute(
                    self._defer, {"task_name": task_name, "user_id": user_id, "due_at": due_at}
                )
            await conn.execute(
                update(background_tasks)
                .where(
                    background_tasks.c.name == task_name,
                    or_(
                        background_tasks.c.idle_watermark.is_(None),
                        background_tasks.c.idle_watermark < watermark,
                    ),
                )
                .values(idle_watermark=watermark)
            )

    # --- leases ---------------------------------------------------------------------------

    async def lease_start(self, active: Sequence[str]) -> datetime | None:
        """The earliest moment from which recovery may have work one lease later: the oldest
        creation time of a pending run or the oldest heartbeat of a running one, among the
        runs not in `active` (those the caller runs or is about to start). None if none."""
        others = task_runs.c.id.not_in(list(active))
        pending = select(func.min(task_runs.c.created_at)).where(
            task_runs.c.status == RunStatus.PENDING.value, others
        )
        running = select(func.min(task_runs.c.heartbeat_at)).where(
            task_runs.c.status == RunStatus.RUNNING.value, others
        )
        async with self._engine.connect() as conn:
            times = [(await conn.execute(q)).scalar() for q in (pending, running)]
        return min((t for t in times if t is not None), default=None)

    async def orphaned_runs(self, created_before: datetime) -> list[str]:
        """Runs still pending that were created at or before `created_before`: their creator
        died between creating and starting them (or queued them as a rerun when it stopped)."""
        query = select(task_runs.c.id).where(
            task_runs.c.status == RunStatus.PENDING.value, task_runs.c.created_at <= created_before
        )
        async with self._engine.connect() as conn:
            return [row.id for row in (await conn.execute(query)).all()]

    async def running_users_of_stopped_runs(
        self, stopped_since: datetime
    ) -> list[tuple[str, str, str]]:
        """(run id, task name, user id) of users still `running` in runs `interrupted` since
        `stopped_since`: in worker mode, units a stopped server left to their workers."""
        query = (
            select(task_run_users.c.run_id, task_runs.c.task_name, task_run_users.c.user_id)
            .select_from(task_runs.join(task_run_users, task_run_users.c.run_id == task_runs.c.id))
            .where(
                task_runs.c.status == RunStatus.INTERRUPTED.value,
                task_runs.c.completed_at >= stopped_since,
                task_run_users.c.status == UserStatus.RUNNING.value,
            )
        )
        async with self._engine.connect() as conn:
            return [(r.run_id, r.task_name, r.user_id) for r in await conn.execute(query)]

    async def stale_runs(self, heartbeat_before: datetime) -> list[str]:
        """Running runs whose last heartbeat is at or before `heartbeat_before`."""
        query = select(task_runs.c.id).where(
            task_runs.c.status == RunStatus.RUNNING.value,
            task_runs.c.heartbeat_at <= heartbeat_before,
        )
        async with self._engine.connect() as conn:
            return [row.id for row in (await conn.execute(query)).all()]

    async def interrupt_stale_run(
        self, run_id: str, heartbeat_before: datetime, now: datetime, dead: Sequence[str]
    ) -> list[str] | None:
        """Mark a run whose heartbeat is at or before `heartbeat_before` as interrupted, with its
        pending users and those of its running users listed in `dead` (read before: a user
        that started since, or that a live worker runs, stays running and keeps its lock).
        Releases the interrupted users' locks. Returns those users, in list order, or None if
        another caller interrupted the run first (or it heart-beat again meanwhile)."""
        async with self._engine.begin() as conn:
            claimed = await conn.execute(
                update(task_runs)
                .where(
                    task_runs.c.id == run_id,
                    task_runs.c.status == RunStatus.RUNNING.value,
                    task_runs.c.heartbeat_at <= heartbeat_before,
                )
                .values(
                    status=RunStatus.INTERRUPTED.value,
                    completed_at=now,
                    error="owner stopped (no heartbeat within the lease)",
                )
            )
            if claimed.rowcount != 1:
                return None
            unfinished = and_(
                task_run_users.c.run_id == run_id,
                or_(
                    task_run_users.c.status == UserStatus.PENDING.value,
                    and_(
                        task_run_users.c.status == UserStatus.RUNNING.value,
                        task_run_users.c.user_id.in_(list(dead)),
                    ),
                ),
            )
            query = (
                select(task_run_users.c.user_id)
                .where(unfinished)
                .order_by(task_run_users.c.position)
            )
            users = [r.user_id for r in await conn.execute(query)]
            await conn.execute(
                update(task_run_users)
                .where(unfinished)
                .values(status=UserStatus.INTERRUPTED.value, completed_at=now)
            )
            if dead:
                await conn.execute(
                    task_user_locks.delete().where(
                        task_user_locks.c.run_id == run_id,
                        task_user_locks.c.user_id.in_(list(dead)),
                    )
                )
        return users

    # --- replicas -------------------------------------------------------------------------

    async def replica_heartbeat(self, replica_id: str, now: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                self._replica,
                {
                    "replica_id": replica_id,
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                    "started_at": now,
                    "heartbeat_at": now,
                    "last_tick_at": now,
                },
            )

    async def replicas(self, since: datetime) -> list[dict[str, Any]]:
        """Replicas that heart-beat at or after `since`."""
        query = select(scheduler_replicas).where(scheduler_replicas.c.heartbeat_at >= since)
        async with self._engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]
