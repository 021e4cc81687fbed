"""Decides when tasks run: cron slots and idle users, exactly once across replicas.

Every firing is claimed in the database before anything runs: a cron slot by the unique
(task, slot key) of its run row, an idle episode by a conditional write to its `idle_state`
row. A replica that loses a claim does nothing, so any number of replicas can tick at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.background.cron import due_slots, next_slot
from ralph.background.executor import Executor
from ralph.background.models import (
    CronTrigger,
    IdleTrigger,
    RunStatus,
    StoredTask,
    TriggerType,
    UserStatus,
)
from ralph.background.registry import TaskRegistry
from ralph.clock import Clock
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

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TickReport:
    started: list[str]
    missed: int
    idle_users: int
    recovered: list[str]
    next_wake: datetime


class Scheduler:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        registry: TaskRegistry,
        executor: Executor,
        clock: Clock,
        idle_interval_seconds: float = 30.0,
        lease_seconds: float = 60.0,
        rerun_interrupted: int = 1,
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._executor = executor
        self._clock = clock
        self._idle_interval = timedelta(seconds=idle_interval_seconds)
        self._lease = timedelta(seconds=lease_seconds)
        self._rerun_interrupted = rerun_interrupted
        self.replica_id = executor.owner
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.last_tick: datetime | None = None
        registry.on_change(self._wake.set)

    # --- one tick -------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        """Fire everything due now; return what was started and when to look again."""
        now = self._clock.now()
        tasks = [t for t in (await self._registry.refresh()).values() if t.definition.enabled]
        started: list[str] = []
        missed = 0
        idle_users = 0
        # Re-tick at least hourly (and every idle interval while idle tasks exist), even if
        # no slot is due: that picks up changes made through other replicas.
        wake = now + timedelta(hours=1)
        recovered = await self.recover(now)
        if await self._others_running():
            wake = min(wake, now + self._lease)
        for stored in tasks:
            trigger = stored.definition.trigger
            if isinstance(trigger, CronTrigger):
                run_ids, n_missed = await self._fire_cron(stored, trigger, now)
                started += run_ids
                missed += n_missed
                wake = min(wake, next_slot(trigger.schedule, trigger.timezone, now))
            else:
                wake = min(wake, now + self._idle_interval)
                run_id, n_users = await self._fire_idle(stored, trigger, now)
                if run_id:
                    started.append(run_id)
                    idle_users += n_users
        for run_id in started:
            self._executor.start(run_id)
        await self._heartbeat(now)
        self.last_tick = now
        return TickReport(started, missed, idle_users, recovered, wake)

    async def _last_slot(self, task_name: str) -> datetime | None:
        query = select(task_runs.c.slot_at).where(
            task_runs.c.task_name == task_name,
            task_runs.c.trigger_type == TriggerType.CRON.value,
            task_runs.c.slot_at.is_not(None),
        )
        query = query.order_by(task_runs.c.slot_at.desc()).limit(1)
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def _fire_cron(
        self, stored: StoredTask, trigger: CronTrigger, now: datetime
    ) -> tuple[list[str], int]:
        task = stored.definition
        after = stored.schedule_from
        last = await self._last_slot(task.name)
        if last is not None and last > after:
            after = last
        slots = due_slots(trigger.schedule, trigger.timezone, after, now)
        if not slots:
            return [], 0
        grace = timedelta(seconds=task.misfire_grace_seconds)
        # Coalesce: only the newest due slot may run, and only inside the grace window;
        # every other due slot is recorded as missed.
        latest = slots[-1]
        runnable = latest if now - latest <= grace else None
        started: list[str] = []
        missed = 0
        for slot in slots:
            status = RunStatus.PENDING if slot == runnable else RunStatus.MISSED
            run_id = await self._executor.runs.create(
                task,
                TriggerType.CRON,
                task.user_ids if status is RunStatus.PENDING else [],
                now,
                slot_key=f"cron:{slot.isoformat()}",
                slot_at=slot,
                status=status,
            )
            if run_id is None:
                continue  # another replica claimed this slot
            if status is RunStatus.PENDING:
                started.append(run_id)
                log.info("cron_fired", task=task.name, slot=slot.isoformat(), run_id=run_id)
            else:
                missed += 1
                log.warning("cron_missed", task=task.name, slot=slot.isoformat())
        return started, missed

    async def due_idle_users(
        self, task_name: str, trigger: IdleTrigger, now: datetime
    ) -> tuple[list[tuple[str, datetime]], list[tuple[str, datetime]], datetime]:
        """The task's users whose idle episode is due now, and those held back by the cooldown.

        Due: in the task's list, idle for `idle_minutes`, a message since the task last ran
        for them, and past the cooldown since that run. Only activity newer than the task's
        watermark is read (an index range on `last_message_at`), plus deferred users whose
        cooldown ends by now, so the cost follows the users becoming due, not the size of the
        activity table. Returns (due, deferred with their due time, new watermark).
        """
        idle_cutoff = now - timedelta(minutes=trigger.idle_minutes)
        cooldown = timedelta(minutes=trigger.cooldown_minutes)
        watermark_query = select(background_tasks.c.idle_watermark).where(
            background_tasks.c.name == task_name
        )
        columns = (
            user_activity.c.user_id,
            user_activity.c.last_message_at,
            idle_state.c.episode_message_at,
            idle_state.c.last_run_at,
        )
        state_join = and_(
            idle_state.c.task_name == task_name, idle_state.c.user_id == user_activity.c.user_id
        )
        async with self._engine.connect() as conn:
            watermark = (await conn.execute(watermark_query)).scalar()
            window = select(*columns).select_from(
                user_activity.join(
                    task_users,
                    and_(
                        task_users.c.task_name == task_name,
                        task_users.c.user_id == user_activity.c.user_id,
                    ),
                ).outerjoin(idle_state, state_join)
            )
            window = window.where(user_activity.c.last_message_at <= idle_cutoff)
            if watermark is not None:
                window = window.where(user_activity.c.last_message_at > watermark)
            deferred = (
                select(*columns)
                .select_from(
                    idle_deferred.join(
                        user_activity, user_activity.c.user_id == idle_deferred.c.user_id
                    ).outerjoin(idle_state, state_join)
                )
                .where(idle_deferred.c.task_name == task_name, idle_deferred.c.due_at <= now)
            )
            rows = [*(await conn.execute(window)).all(), *(await conn.execute(deferred)).all()]
        due: dict[str, datetime] = {}
        held: list[tuple[str, datetime]] = []
        for user_id, message_at, episode_at, last_run_at in rows:
            if message_at > idle_cutoff:
                continue  # active again: the window will find them when they go idle
            if episode_at is not None and message_at <= episode_at:
                continue  # this episode already ran
            if last_run_at is not None and last_run_at > now - cooldown:
                held.append((user_id, last_run_at + cooldown))
                continue
            due[user_id] = message_at
        new_watermark = idle_cutoff if watermark is None else max(watermark, idle_cutoff)
        return list(due.items()), held, new_watermark

    async def _claim_episode(
        self,
        task_name: str,
        user_id: str,
        message_at: datetime,
        now: datetime,
        cooldown_cutoff: datetime,
    ) -> bool:
        """Claim the user's idle episode (the one ending with the message at `message_at`).
        True for exactly one caller, in any number of processes."""
        async with self._engine.begin() as conn:
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

    async def _fire_idle(
        self, stored: StoredTask, trigger: IdleTrigger, now: datetime
    ) -> tuple[str | None, int]:
        task = stored.definition
        cooldown_cutoff = now - timedelta(minutes=trigger.cooldown_minutes)
        due, held, watermark = await self.due_idle_users(task.name, trigger, now)
        claimed = [
            user_id
            for user_id, message_at in due
            if await self._claim_episode(task.name, user_id, message_at, now, cooldown_cutoff)
        ]
        async with self._engine.begin() as conn:
            # every deferred row read this tick has been dealt with: due now, held again
            # (re-inserted below), or active again (the window will see them go idle)
            await conn.execute(
                delete(idle_deferred).where(
                    idle_deferred.c.task_name == task.name, idle_deferred.c.due_at <= now
                )
            )
            for user_id, due_at in held:
                await conn.execute(
                    upsert(self._engine, idle_deferred, lambda p: {"due_at": p.due_at}),
                    {"task_name": task.name, "user_id": user_id, "due_at": due_at},
                )
            # Moves only forward, whichever replica writes last.
            await conn.execute(
                update(background_tasks)
                .where(
                    background_tasks.c.name == task.name,
                    or_(
                        background_tasks.c.idle_watermark.is_(None),
                        background_tasks.c.idle_watermark < watermark,
                    ),
                )
                .values(idle_watermark=watermark)
            )
        if not claimed:
            return None, 0
        run_id = await self._executor.runs.create(task, TriggerType.IDLE, claimed, now)
        log.info("idle_fired", task=task.name, users=len(claimed), run_id=run_id)
        return run_id, len(claimed)

    # --- crash recovery -------------------------------------------------------------------

    async def _others_running(self) -> bool:
        """Whether another process owns a running run (whose lease this one must watch)."""
        query = (
            select(task_runs.c.id)
            .where(
                task_runs.c.status == RunStatus.RUNNING.value,
                task_runs.c.owner != self.replica_id,
            )
            .limit(1)
        )
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def recover(self, now: datetime) -> list[str]:
        """Runs whose owner stopped heart-beating for a lease are marked `interrupted`; their
        unfinished users are re-run once in a new run. Returns the new runs' ids."""
        stale = now - self._lease
        query = select(task_runs.c.id).where(
            task_runs.c.status == RunStatus.RUNNING.value, task_runs.c.heartbeat_at < stale
        )
        async with self._engine.connect() as conn:
            candidates = (await conn.execute(query)).all()
        new_runs: list[str] = []
        for (run_id,) in candidates:
            async with self._engine.begin() as conn:
                claimed = await conn.execute(
                    update(task_runs)
                    .where(
                        task_runs.c.id == run_id,
                        task_runs.c.status == RunStatus.RUNNING.value,
                        task_runs.c.heartbeat_at < stale,
                    )
                    .values(
                        status=RunStatus.INTERRUPTED.value,
                        completed_at=now,
                        error="owner stopped (no heartbeat within the lease)",
                    )
                )
                if claimed.rowcount != 1:
                    continue  # another replica recovered it
                unfinished = [
                    r.user_id
                    for r in (
                        await conn.execute(
                            select(task_run_users.c.user_id)
                            .where(
                                task_run_users.c.run_id == run_id,
                                task_run_users.c.status.in_(
                                    [UserStatus.RUNNING.value, UserStatus.PENDING.value]
                                ),
                            )
                            .order_by(task_run_users.c.position)
                        )
                    ).all()
                ]
                await conn.execute(
                    update(task_run_users)
                    .where(
                        task_run_users.c.run_id == run_id,
                        task_run_users.c.status.in_(
                            [UserStatus.RUNNING.value, UserStatus.PENDING.value]
                        ),
                    )
                    .values(status=UserStatus.INTERRUPTED.value, completed_at=now)
                )
                await conn.execute(
                    task_user_locks.delete().where(task_user_locks.c.run_id == run_id)
                )
            log.warning("run_interrupted", run_id=run_id, unfinished=len(unfinished))
            if unfinished and self._rerun_interrupted > 0:
                task = await self._executor.runs.snapshot(run_id)
                rerun = await self._executor.runs.create(
                    task,
                    TriggerType.MANUAL,
                    unfinished,
                    now,
                    slot_key=f"rerun:{run_id}",
                )
                if rerun is not None:
                    new_runs.append(rerun)
        for run_id in new_runs:
            self._executor.start(run_id)
        return new_runs

    # --- replicas and the loop ------------------------------------------------------------

    async def _heartbeat(self, now: datetime) -> None:
        statement = upsert(
            self._engine,
            scheduler_replicas,
            lambda proposed: {
                "heartbeat_at": proposed.heartbeat_at,
                "last_tick_at": proposed.last_tick_at,
            },
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                statement,
                {
                    "replica_id": self.replica_id,
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                    "started_at": now,
                    "heartbeat_at": now,
                    "last_tick_at": now,
                },
            )
        for run_id in self._executor.active_runs:
            await self._executor.runs.heartbeat(run_id, now)

    async def replicas(self, since: datetime) -> list[dict[str, object]]:
        query = select(scheduler_replicas).where(scheduler_replicas.c.heartbeat_at >= since)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [dict(r) for r in rows]

    async def run_forever(self) -> None:
        """Tick, then sleep until the next due slot, the idle interval, or a task change."""
        while True:
            try:
                report = await self.tick()
                wake = report.next_wake
            except Exception:
                log.exception("scheduler_tick_failed")
                wake = self._clock.now() + timedelta(seconds=5)
            self._wake.clear()
            sleeper = asyncio.create_task(self._clock.sleep_until(wake))
            waker = asyncio.create_task(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pending in (sleeper, waker):
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pending

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self.run_forever(), name="ralph-scheduler")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
