"""SQL state of the scheduler: idle episodes (claims, deferred users) and replicas."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Join, String, and_, delete, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.background.models import TaskDefinition, TriggerType
from ralph.background.run_store import RunStore
from ralph.background.task_store import TaskStore
from ralph.db.engine import insert_ignore, upsert
from ralph.db.tables import (
    idle_deferred,
    idle_pending,
    idle_state,
    scheduler_replicas,
    task_users,
    user_activity,
)


@dataclass(frozen=True, slots=True)
class WaitingUser:
    """A user whose episode started (as the scheduler first saw it) `since`, for a task with a
    max wait; their activity and idle state now, and whether they are still in the task."""

    user_id: str
    since: datetime
    in_task: bool
    last_message_at: datetime | None
    episode_message_at: datetime | None
    last_run_at: datetime | None

    @property
    def armed(self) -> bool:
        """A message since the task's last episode for them."""
        return self.last_message_at is not None and (
            self.episode_message_at is None or self.last_message_at > self.episode_message_at
        )


@dataclass(frozen=True, slots=True)
class IdleCandidate:
    """A task user whose last message is old enough, with the task's idle state for them."""

    user_id: str
    last_message_at: datetime
    episode_message_at: datetime | None
    last_run_at: datetime | None


# in `_task_activity`: a user with a message since the task's last episode for them (or none)
_ARMED = or_(
    idle_state.c.episode_message_at.is_(None),
    user_activity.c.last_message_at > idle_state.c.episode_message_at,
)


def _task_activity(task_name: str) -> Join:
    """The activity of the task's users, with their idle state for the task (if any)."""
    return user_activity.join(
        task_users,
        and_(task_users.c.task_name == task_name, task_users.c.user_id == user_activity.c.user_id),
    ).outerjoin(
        idle_state,
        and_(idle_state.c.task_name == task_name, idle_state.c.user_id == user_activity.c.user_id),
    )


class ScheduleStore:
    """Idle episodes and replicas. An idle run is created, and a task's idle watermark moved,
    through the stores that own those tables, in this store's transaction."""

    def __init__(
        self,
        engine: AsyncEngine,
        runs: RunStore,
        tasks: TaskStore,
        reads: AsyncEngine | None = None,
    ) -> None:
        self._engine = engine
        # transactions that only read (SQLite: see ralph.db.engine.create_read_engine)
        self._reads = reads or engine
        self._runs = runs
        self._tasks = tasks
        self._defer = upsert(engine, idle_deferred, lambda p: {"due_at": p.due_at})
        self._replica = upsert(
            engine,
            scheduler_replicas,
            lambda p: {"heartbeat_at": p.heartbeat_at, "last_tick_at": p.last_tick_at},
        )

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
            .select_from(_task_activity(task_name))
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
        async with self._reads.connect() as conn:
            watermark = await TaskStore.watermark_in(conn, task_name)
            if watermark is not None:
                window = window.where(user_activity.c.last_message_at > watermark)
            rows = [*(await conn.execute(window)).all(), *(await conn.execute(deferred)).all()]
        return [IdleCandidate(*row) for row in rows], watermark

    async def note_episode_starts(
        self, task_name: str, idle_cutoff: datetime, heard: Mapping[str, datetime]
    ) -> None:
        """Record when each episode of the task's users that is not idle yet (a message after
        `idle_cutoff`, none fired for it) started, if not recorded: the user's first activity
        `heard` of since the last pass, when it belongs to that episode, or else their last
        message, as this pass sees it (an index range on `last_message_at`: the active users
        only)."""
        users = list(heard)
        first_heard = [
            select(
                user_activity.c.user_id,
                user_activity.c.last_message_at,
                idle_state.c.episode_message_at,
            )
            .select_from(_task_activity(task_name))
            .where(
                user_activity.c.user_id.in_(users[start : start + 1000]),
                user_activity.c.last_message_at > idle_cutoff,
                _ARMED,
            )
            for start in range(0, len(users), 1000)
        ]
        source = (
            select(
                literal(task_name, String()),
                user_activity.c.user_id,
                user_activity.c.last_message_at,
            )
            .select_from(_task_activity(task_name))
            .where(user_activity.c.last_message_at > idle_cutoff, _ARMED)
        )
        statement = insert_ignore(self._engine, idle_pending).from_select(
            ["task_name", "user_id", "since"], source
        )
        async with self._engine.begin() as conn:
            for query in first_heard:
                # in the episode: after its previous one and within its activity (a time
                # older than the idle cutoff may have been followed by an idle gap)
                starts = [
                    {"task_name": task_name, "user_id": user_id, "since": heard[user_id]}
                    for user_id, last, previous in (await conn.execute(query)).all()
                    if idle_cutoff < heard[user_id] <= last
                    and (previous is None or heard[user_id] > previous)
                ]
                if starts:
                    await conn.execute(insert_ignore(self._engine, idle_pending), starts)
            await conn.execute(statement)

    async def waited_too_long(self, task_name: str, started_before: datetime) -> list[WaitingUser]:
        """The task's recorded episode starts at or before `started_before`, with each user's
        activity and idle state now."""
        state = and_(
            idle_state.c.task_name == task_name, idle_state.c.user_id == idle_pending.c.user_id
        )
        member = and_(
            task_users.c.task_name == task_name, task_users.c.user_id == idle_pending.c.user_id
        )
        query = (
            select(
                idle_pending.c.user_id,
                idle_pending.c.since,
                task_users.c.user_id.is_not(None),
                user_activity.c.last_message_at,
                idle_state.c.episode_message_at,
                idle_state.c.last_run_at,
            )
            .select_from(
                idle_pending.outerjoin(task_users, member)
                .outerjoin(user_activity, user_activity.c.user_id == idle_pending.c.user_id)
                .outerjoin(idle_state, state)
            )
            .where(idle_pending.c.task_name == task_name, idle_pending.c.since <= started_before)
        )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [WaitingUser(u, s, bool(m), a, e, r) for u, s, m, a, e, r in rows]

    async def first_episode_start(self, task_name: str) -> datetime | None:
        """The oldest recorded episode start of the task (it is due max_wait after it)."""
        query = select(func.min(idle_pending.c.since)).where(idle_pending.c.task_name == task_name)
        async with self._reads.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def next_idle_due(
        self, task_name: str, idle_cutoff: datetime
    ) -> tuple[datetime | None, datetime | None]:
        """What bounds the task's next idle check: the oldest last message, after
        `idle_cutoff`, of a user in the task's list (due `idle_minutes` after it), and the
        earliest time a deferred user is looked at again (None: none). Each is one index
        range read from its low end (the activity index on `last_message_at`, the deferred
        users' on (task, due_at)), whatever the size of the tables."""
        member = (
            select(task_users.c.user_id)
            .where(
                task_users.c.task_name == task_name,
                task_users.c.user_id == user_activity.c.user_id,
            )
            .exists()
        )
        active = (
            select(user_activity.c.last_message_at)
            .where(user_activity.c.last_message_at > idle_cutoff, member)
            .order_by(user_activity.c.last_message_at)
            .limit(1)
        )
        deferred = select(func.min(idle_deferred.c.due_at)).where(
            idle_deferred.c.task_name == task_name
        )
        async with self._reads.connect() as conn:
            oldest_active = (await conn.execute(active)).scalar()
            first_deferred = (await conn.execute(deferred)).scalar()
        return oldest_active, first_deferred

    async def armed_users(self, task_name: str) -> int:
        """How many of the task's users have a message since their last idle episode (or
        never had one): each will fire once idle, past the cooldown."""
        query = select(func.count()).select_from(_task_activity(task_name)).where(_ARMED)
        async with self._reads.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def fire_idle(
        self,
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
            run_id = await self._runs.create_in(conn, task, TriggerType.IDLE, claimed, now)
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
        *,
        restarted: Sequence[tuple[str, datetime]] = (),
        ended: Sequence[str] = (),
    ) -> None:
        """Replace the deferred users due by `now` with `held` (user, due time), and move the
        task's watermark forward. Max wait: the episodes of `restarted` now count from the
        time given (a user the cooldown holds back), those of `ended` are forgotten (fired,
        or no longer armed)."""
        async with self._engine.begin() as conn:
            for user_id, since in restarted:
                await conn.execute(
                    update(idle_pending)
                    .where(idle_pending.c.task_name == task_name, idle_pending.c.user_id == user_id)
                    .values(since=since)
                )
            for start in range(0, len(ended), 1000):
                await conn.execute(
                    delete(idle_pending).where(
                        idle_pending.c.task_name == task_name,
                        idle_pending.c.user_id.in_(ended[start : start + 1000]),
                    )
                )
            await conn.execute(
                delete(idle_deferred).where(
                    idle_deferred.c.task_name == task_name, idle_deferred.c.due_at <= now
                )
            )
            for user_id, due_at in held:
                await conn.execute(
                    self._defer, {"task_name": task_name, "user_id": user_id, "due_at": due_at}
                )
            await self._tasks.advance_watermark_in(conn, task_name, watermark)

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
        async with self._reads.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]
