"""Decides when tasks run: cron slots and idle users, exactly once across replicas.

Every firing is claimed in the database before anything runs: a cron slot by the unique
(task, slot key) of its run row, an idle episode by a conditional write to its `idle_state`
row. A replica that loses a claim does nothing, so any number of replicas can tick at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

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
from ralph.background.schedule_store import ScheduleStore
from ralph.clock import Clock

log = structlog.get_logger(__name__)

# (run id, user ids) -> those of the users whose unit a live worker process is running
UnitsAlive = Callable[[str, Sequence[str]], Awaitable[set[str]]]


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
        store: ScheduleStore,
        registry: TaskRegistry,
        executor: Executor,
        clock: Clock,
        idle_interval_seconds: float = 30.0,
        lease_seconds: float = 60.0,
        units_alive: UnitsAlive | None = None,
    ) -> None:
        """`units_alive` (the ARQ mode's) tells which running users of a crashed server's run
        are still being run by workers: recovery leaves those to their workers."""
        self._store = store
        self._registry = registry
        self._executor = executor
        self._clock = clock
        self._idle_interval = timedelta(seconds=idle_interval_seconds)
        self._lease = timedelta(seconds=lease_seconds)
        self._units_alive = units_alive
        self.replica_id = executor.owner
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.last_tick: datetime | None = None
        registry.on_change(self._wake.set)

    @property
    def executor(self) -> Executor:
        return self._executor

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
        if await self._store.others_running(self.replica_id):
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

    async def _fire_cron(
        self, stored: StoredTask, trigger: CronTrigger, now: datetime
    ) -> tuple[list[str], int]:
        task = stored.definition
        after = stored.schedule_from
        last = await self._store.last_cron_slot(task.name)
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
        for them, and past the cooldown since that run. Returns (due users with the message
        that ends their episode, held users with the time to look again, new watermark).
        """
        idle_cutoff = now - timedelta(minutes=trigger.idle_minutes)
        cooldown = timedelta(minutes=trigger.cooldown_minutes)
        candidates, watermark = await self._store.idle_candidates(task_name, idle_cutoff, now)
        due: dict[str, datetime] = {}
        held: list[tuple[str, datetime]] = []
        for c in candidates:
            if c.last_message_at > idle_cutoff:
                continue  # active again: the window will find them when they go idle
            if c.episode_message_at is not None and c.last_message_at <= c.episode_message_at:
                continue  # this episode already ran
            if c.last_run_at is not None and c.last_run_at > now - cooldown:
                held.append((c.user_id, c.last_run_at + cooldown))
                continue
            due[c.user_id] = c.last_message_at
        new_watermark = idle_cutoff if watermark is None else max(watermark, idle_cutoff)
        return list(due.items()), held, new_watermark

    async def _fire_idle(
        self, stored: StoredTask, trigger: IdleTrigger, now: datetime
    ) -> tuple[str | None, int]:
        task = stored.definition
        cooldown_cutoff = now - timedelta(minutes=trigger.cooldown_minutes)
        due, held, watermark = await self.due_idle_users(task.name, trigger, now)
        run_id, claimed = await self._store.fire_idle(
            self._executor.runs, task, due, now, cooldown_cutoff
        )
        # after the run exists: a crash before this line re-reads the same window next time
        await self._store.save_idle_progress(task.name, now, held, watermark)
        if run_id is not None:
            log.info("idle_fired", task=task.name, users=len(claimed), run_id=run_id)
        return run_id, len(claimed)

    # --- crash recovery -------------------------------------------------------------------

    async def recover(self, now: datetime) -> list[str]:
        """Runs whose owner stopped heart-beating for a lease are marked `interrupted`; their
        unfinished users (but those a live worker still runs) are re-run in a new run, within
        the rerun limit. Runs left pending for a lease are started. Returns the ids of the
        runs started."""
        stale = now - self._lease
        new_runs: list[str] = []
        # created but never started (their creator died in between): start them here;
        # starting is a conditional pending -> running write, so only one replica runs each
        for run_id in await self._store.orphaned_runs(stale):
            if run_id not in self._executor.active_runs:
                log.warning("run_orphaned", run_id=run_id)
                new_runs.append(run_id)
        for run_id in await self._store.stale_runs(stale):
            running = await self._executor.runs.user_ids(run_id, UserStatus.RUNNING)
            alive: set[str] = set()
            if self._units_alive is not None and running:
                alive = await self._units_alive(run_id, running)
            dead = [u for u in running if u not in alive]
            unfinished = await self._store.interrupt_stale_run(run_id, stale, now, dead)
            if unfinished is None:
                continue  # another replica recovered it
            log.warning("run_interrupted", run_id=run_id, unfinished=len(unfinished))
            if unfinished:
                task = await self._executor.runs.snapshot(run_id)
                rerun = await self._executor.create_rerun(run_id, task, unfinished)
                if rerun is not None:
                    new_runs.append(rerun)
        for run_id in new_runs:
            self._executor.start(run_id)
        if self._units_alive is not None:
            await self._fail_units_of_dead_workers(now, self._units_alive)
        return new_runs

    async def _fail_units_of_dead_workers(self, now: datetime, units_alive: UnitsAlive) -> None:
        """Users a stopped (or crashed) server left to their workers, whose worker has since
        died: nobody waits for them any more, so fail them here and free their locks. A unit
        runs at most a day (the longest `timeout_seconds`), so older runs are not looked at."""
        left = await self._store.running_users_of_stopped_runs(now - timedelta(days=1, hours=1))
        by_run: dict[str, list[tuple[str, str]]] = {}
        for run_id, task_name, user_id in left:
            by_run.setdefault(run_id, []).append((task_name, user_id))
        for run_id, users in by_run.items():
            alive = await units_alive(run_id, [user_id for _, user_id in users])
            for task_name, user_id in users:
                if user_id not in alive:
                    log.warning("worker_lost", run_id=run_id, user_id=user_id)
                    await self._executor.runs.fail_unfinished_user(
                        run_id, task_name, user_id, now, "worker lost after the server stopped"
                    )

    # --- replicas and the loop ------------------------------------------------------------

    async def _heartbeat(self, now: datetime) -> None:
        await self._store.replica_heartbeat(self.replica_id, now)
        for run_id in self._executor.active_runs:
            await self._executor.runs.heartbeat(run_id, now)

    async def replicas(self, since: datetime) -> list[dict[str, Any]]:
        return await self._store.replicas(since)

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
