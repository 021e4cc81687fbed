"""Decides when tasks run: cron slots and idle users, exactly once across replicas.

Every firing is claimed in the database before anything runs: a cron slot by the unique
(task, slot key) of its run row, an idle episode by a conditional write to its `idle_state`
row. A replica that loses a claim does nothing, so any number of replicas can tick at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from ralph.aio import cancel_and_wait
from ralph.background.coordinator import RunCoordinator
from ralph.background.models import (
    NO_RETRIES,
    CronTrigger,
    IdleTrigger,
    RunStatus,
    StoredTask,
    TaskDefinition,
    TriggerType,
    UserStatus,
)
from ralph.background.registry import TaskRegistry
from ralph.background.run_store import RunStore, UnitEnd
from ralph.background.schedule_store import ScheduleStore
from ralph.background.slots import DueSlot, due_instants, next_instant, ran_this_local_day
from ralph.clock import Clock, sleep_until_or
from ralph.observability.events import SCHEDULER_LAG
from ralph.reasons import EndReason
from ralph.users.store import ProfileStore

log = structlog.get_logger(__name__)

# a task (or recovery) that failed in a tick is tried again this soon
_RETRY_FAILED = timedelta(seconds=30)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


# (run id, user ids) -> those of the users whose unit a live worker process is running
UnitsAlive = Callable[[str, Sequence[str]], Awaitable[set[str]]]


@dataclass(slots=True)
class IdlePass:
    """What one pass over an idle task found: due users (with the message that ends their
    episode), users the cooldown holds (with when to look again), the new watermark; and
    for a max wait, episodes that now count from another time, and episodes to forget."""

    due: dict[str, datetime]
    held: list[tuple[str, datetime]]
    watermark: datetime
    restarted: list[tuple[str, datetime]] = field(default_factory=list[tuple[str, datetime]])
    ended: list[str] = field(default_factory=list[str])


@dataclass(frozen=True, slots=True)
class TickReport:
    started: list[str]
    recovered: list[str]
    next_wake: datetime


class Scheduler:
    def __init__(
        self,
        *,
        store: ScheduleStore,
        runs: RunStore,
        profiles: ProfileStore,
        registry: TaskRegistry,
        coordinator: RunCoordinator,
        clock: Clock,
        idle_interval_seconds: float = 30.0,
        lease_seconds: float = 60.0,
        units_alive: UnitsAlive | None = None,
        sweeps: Sequence[Callable[[], Awaitable[object]]] = (),
    ) -> None:
        """`units_alive` (the ARQ mode's) tells which running users of a crashed server's run
        are still being run by workers: recovery leaves those to their workers. `sweeps` run
        once a pass (at least hourly), each safe to run on every replica at once (expiring
        old proposals)."""
        self._store = store
        self._runs = runs
        self._profiles = profiles
        self._registry = registry
        self._coordinator = coordinator
        self._clock = clock
        self._idle_interval = timedelta(seconds=idle_interval_seconds)
        self._lease = timedelta(seconds=lease_seconds)
        self._units_alive = units_alive
        self._sweeps = list(sweeps)
        self.replica_id = coordinator.owner
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.last_tick: datetime | None = None
        # what `note_activity` compares with: the loop's planned wake, the shortest idle time
        self._next_wake: datetime | None = None
        self._min_idle: timedelta | None = None
        # with a max-wait idle task: each user's first activity heard of since the last tick
        # (an episode that starts then is recorded from it, not from the last message the
        # next tick sees, up to an idle check later)
        self._max_wait = False
        self._first_activity: dict[str, datetime] = {}
        # the last tick's failures: task name -> error, and recovery's
        self.errors: dict[str, str] = {}
        self.recovery_error: str | None = None
        registry.on_change(self._wake.set)

    def wake(self) -> None:
        """Plan again now (a change made through this process may bring a firing forward)."""
        self._wake.set()

    # --- one tick -------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        """Fire everything due now; return what was started and when to look again.

        Each task is fired on its own: one that fails (a definition the scheduler cannot
        evaluate, a database error) is logged and recorded in `errors`, and the other tasks,
        recovery and the heartbeat go on.
        """
        now = self._clock.now()
        tasks = [t for t in (await self._registry.refresh()).values() if t.definition.enabled]
        idle = [
            t.definition.trigger for t in tasks if isinstance(t.definition.trigger, IdleTrigger)
        ]
        self._min_idle = min((timedelta(minutes=t.idle_minutes) for t in idle), default=None)
        self._max_wait = any(t.max_wait_minutes is not None for t in idle)
        heard, self._first_activity = self._first_activity, {}
        self.errors = {
            k: v for k, v in self.errors.items() if k in {t.definition.name for t in tasks}
        }
        started: list[str] = []
        # Re-tick at least hourly (and every idle interval while idle tasks exist), even if
        # no slot is due: that picks up changes made through other replicas.
        wake = now + timedelta(hours=1)
        recovered: list[str] = []
        try:
            recovered, left_to_workers = await self.recover(now)
            self.recovery_error = None
            if left_to_workers:
                wake = min(wake, now + self._lease)
        except Exception as exc:
            log.exception("scheduler_recovery_failed")
            self.recovery_error = _describe(exc)
            wake = min(wake, now + _RETRY_FAILED)
        for stored in tasks:
            name = stored.definition.name
            try:
                run_ids, task_wake = await self._fire(stored, now, heard)
            except Exception as exc:
                log.exception("scheduler_task_failed", task=name)
                self.errors[name] = _describe(exc)
                wake = min(wake, now + _RETRY_FAILED)
                continue
            for run_id in run_ids:
                self._coordinator.start(run_id)
            started += run_ids
            if task_wake is None:
                # a cron expression stored before expressions were checked: nothing to retry
                # until the task is replaced, which wakes the loop
                self.errors[name] = "the cron expression has no fire time ahead"
            else:
                self.errors.pop(name, None)
                wake = min(wake, task_wake)
        for sweep in self._sweeps:
            try:
                await sweep()
            except Exception:
                log.exception("scheduler_sweep_failed")
                wake = min(wake, now + _RETRY_FAILED)
        try:
            # every due time the store knows of bounds the sleep: a pending run (a rerun
            # queued by a stopping server) or a run nobody here runs (another process's, or
            # one this process lost to a database outage) becomes recoverable one lease
            # after it was created or last heart-beat
            lease_start = await self._runs.lease_start(self._coordinator.active_runs)
            if lease_start is not None:
                wake = min(wake, max(now, lease_start + self._lease))
            await self._heartbeat(now)
        except Exception:
            log.exception("scheduler_heartbeat_failed")
            wake = min(wake, now + _RETRY_FAILED)
        self.last_tick = now
        return TickReport(started, recovered, wake)

    async def _fire(
        self, stored: StoredTask, now: datetime, heard: Mapping[str, datetime]
    ) -> tuple[list[str], datetime | None]:
        """Fire one task (`heard`: users' first activity heard of since the last tick): (runs
        created, when it is next due)."""
        trigger = stored.definition.trigger
        if isinstance(trigger, CronTrigger):
            zones = sorted(await self.zone_counts(stored.definition, trigger))
            run_ids = await self._fire_cron(stored, trigger, zones, now)
            return run_ids, next_instant(trigger.schedule, zones, now)
        run_id = await self._fire_idle(stored, trigger, now, heard)
        return [run_id] if run_id else [], await self.next_idle_check(stored, trigger, now)

    async def zone_counts(self, task: TaskDefinition, trigger: CronTrigger) -> dict[str, int]:
        """The timezones the task's schedule is read in (its own, or its users'), each with
        how many of the task's users it fires for."""
        if not trigger.per_user:
            return {trigger.timezone: len(task.user_ids)}
        return await self._profiles.zone_counts(task.name, trigger.fallback_timezone)

    async def _fire_cron(
        self, stored: StoredTask, trigger: CronTrigger, zones: list[str], now: datetime
    ) -> list[str]:
        task = stored.definition
        after = stored.schedule_from
        last = await self._runs.last_cron_slot(task.name)
        if last is not None and last > after:
            after = last
        grace = timedelta(seconds=task.misfire_grace_seconds)
        started: list[str] = []
        # oldest first: a crash between two leaves the later ones due on the next tick
        for due in due_instants(trigger.schedule, zones, after, now, grace):
            users, skipped = await self._slot_users(task, trigger, due)
            status = RunStatus.PENDING if due.zones else RunStatus.MISSED
            run_id = await self._runs.create(
                task,
                TriggerType.CRON,
                users,
                now,
                slot_key=f"cron:{due.at.isoformat()}",
                slot_at=due.at,
                status=status,
                skipped=skipped,
            )
            if run_id is None:
                continue  # another replica claimed this slot
            if status is RunStatus.PENDING:
                started.append(run_id)
                SCHEDULER_LAG.observe((now - due.at).total_seconds())
                log.info("cron_fired", task=task.name, slot=due.at.isoformat(), run_id=run_id)
            else:
                log.warning("cron_missed", task=task.name, slot=due.at.isoformat())
        return started

    async def _slot_users(
        self, task: TaskDefinition, trigger: CronTrigger, due: DueSlot
    ) -> tuple[list[str], dict[str, str]]:
        """The users a due slot runs (those of its zones), and those of them skipped with
        the reason: users who moved timezone after running on the slot's local day."""
        if not due.zones:
            return [], {}
        if not trigger.per_user:
            return task.user_ids, {}
        fallback = trigger.fallback_timezone
        users = await self._profiles.users_in_zones(task.name, due.zones, fallback)
        # only a move in the last two days can put an earlier slot on the same local day
        recent = due.at - timedelta(days=2)
        moved = {u: (zone, at) for u, zone, at in users if at is not None and at > recent}
        skipped: dict[str, str] = {}
        if moved:
            last = await self._runs.last_cron_slots(task.name, list(moved))
            for user_id, (zone, moved_at) in moved.items():
                if ran_this_local_day(trigger.schedule, last.get(user_id), moved_at, due.at, zone):
                    skipped[user_id] = (
                        f"already ran on this local day ({zone}) before the timezone changed"
                    )
        return [u for u, _, _ in users], skipped

    async def due_idle_users(
        self,
        task_name: str,
        trigger: IdleTrigger,
        now: datetime,
        heard: Mapping[str, datetime] | None = None,
    ) -> IdlePass:
        """The task's users whose idle episode is due now, and those held back by the cooldown.

        Due: in the task's list, idle for `idle_minutes`, a message since the task last ran
        for them, and past the cooldown since that run; or, with `max_wait_minutes`, still
        active but with an episode that started that long ago (`heard`: users' first
        activity this process heard of since its last tick, which may start an episode).
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
        found = IdlePass(due, held, new_watermark)
        if trigger.max_wait_minutes is not None:
            await self._max_waits(task_name, trigger, now, heard or {}, found)
        return found

    async def _max_waits(
        self,
        task_name: str,
        trigger: IdleTrigger,
        now: datetime,
        heard: Mapping[str, datetime],
        found: IdlePass,
    ) -> None:
        """Add to `found` the users whose episode started `max_wait_minutes` ago or more,
        idle or not (first recording the start of every episode that is not idle yet)."""
        assert trigger.max_wait_minutes is not None
        await self._store.note_episode_starts(
            task_name, now - timedelta(minutes=trigger.idle_minutes), heard
        )
        wait = timedelta(minutes=trigger.max_wait_minutes)
        cooldown = timedelta(minutes=trigger.cooldown_minutes)
        for user in await self._store.waited_too_long(task_name, now - wait):
            if not user.in_task or not user.armed or user.last_message_at is None:
                found.ended.append(user.user_id)  # fired meanwhile, or left the task
            elif user.last_run_at is not None and user.last_run_at > now - cooldown:
                # held back by the cooldown: due when it ends
                found.restarted.append((user.user_id, user.last_run_at + cooldown - wait))
            else:
                found.due.setdefault(user.user_id, user.last_message_at)

    async def _fire_idle(
        self,
        stored: StoredTask,
        trigger: IdleTrigger,
        now: datetime,
        heard: Mapping[str, datetime],
    ) -> str | None:
        task = stored.definition
        cooldown_cutoff = now - timedelta(minutes=trigger.cooldown_minutes)
        found = await self.due_idle_users(task.name, trigger, now, heard)
        run_id, claimed = await self._store.fire_idle(
            task, list(found.due.items()), now, cooldown_cutoff
        )
        # after the run exists: a crash before this line re-reads the same window next time
        await self._store.save_idle_progress(
            task.name,
            now,
            found.held,
            found.watermark,
            restarted=found.restarted,
            ended=[*found.ended, *claimed] if trigger.max_wait_minutes is not None else [],
        )
        if run_id is not None:
            log.info("idle_fired", task=task.name, users=len(claimed), run_id=run_id)
        return run_id

    async def next_idle_check(
        self, stored: StoredTask, trigger: IdleTrigger, now: datetime
    ) -> datetime:
        """When to look at the idle task again: when its next episode can be due, and at the
        latest one idle check interval from now (activity recorded through another replica,
        which this process does not hear of)."""
        due = await self._earliest_idle_due(stored.definition.name, trigger, now)
        fallback = now + self._idle_interval
        return max(now, fallback if due is None else min(due, fallback))

    async def idle_outlook(self, name: str, trigger: IdleTrigger) -> tuple[int, datetime | None]:
        """(users armed now, the earliest time one of them can be due) for an idle task."""
        armed = await self._store.armed_users(name)
        return armed, await self._earliest_idle_due(name, trigger, self._clock.now())

    async def _earliest_idle_due(
        self, name: str, trigger: IdleTrigger, now: datetime
    ) -> datetime | None:
        """The earliest time an episode of the task can be due: the oldest last message of an
        active user plus `idle_minutes`, or a deferred user's time (None: neither)."""
        idle = timedelta(minutes=trigger.idle_minutes)
        active, deferred = await self._store.next_idle_due(name, now - idle)
        due = [t for t in (active + idle if active else None, deferred) if t is not None]
        if trigger.max_wait_minutes is not None:
            started = await self._store.first_episode_start(name)
            if started is not None:
                due.append(started + timedelta(minutes=trigger.max_wait_minutes))
        return min(due, default=None)

    def note_activity(self, user_id: str, at: datetime) -> None:
        """A user was active `at` (recorded through this process): if that makes an idle
        episode due before the loop's next wake, wake it to plan again; with a max-wait task,
        keep the time for the next tick (it may start an episode)."""
        if self._max_wait:
            first = self._first_activity.get(user_id)
            if first is None or at < first:
                self._first_activity[user_id] = at
        if self._min_idle is None or self._next_wake is None:
            return
        if at + self._min_idle < self._next_wake:
            self._wake.set()

    # --- crash recovery -------------------------------------------------------------------

    async def recover(self, now: datetime) -> tuple[list[str], int]:
        """Runs whose owner stopped heart-beating for a lease are marked `interrupted`; their
        unfinished users (but those a live worker still runs) are re-run in a new run, within
        the rerun limit. Runs left pending for a lease are started. Returns the ids of the
        runs started, and how many users of stopped runs are still left to live workers."""
        stale = now - self._lease
        new_runs: list[str] = []
        # created but never started (their creator died in between): start them here;
        # starting is a conditional pending -> running write, so only one replica runs each
        for run_id in await self._runs.orphaned_runs(stale):
            if run_id not in self._coordinator.active_runs:
                log.warning("run_orphaned", run_id=run_id)
                new_runs.append(run_id)
        for run_id in await self._runs.stale_runs(stale):
            running = await self._runs.user_ids(run_id, UserStatus.RUNNING)
            alive: set[str] = set()
            if self._units_alive is not None and running:
                alive = await self._units_alive(run_id, running)
            dead = [u for u in running if u not in alive]
            unfinished = await self._runs.interrupt_stale_run(run_id, stale, now, dead)
            if unfinished is None:
                continue  # another replica recovered it
            log.warning("run_interrupted", run_id=run_id, unfinished=len(unfinished))
            if unfinished:
                task = await self._runs.snapshot(run_id)
                rerun = await self._coordinator.create_rerun(run_id, task, unfinished)
                if rerun is not None:
                    new_runs.append(rerun)
        for run_id in new_runs:
            self._coordinator.start(run_id)
        left = 0
        if self._units_alive is not None:
            left = await self._fail_units_of_dead_workers(now, self._units_alive)
        return new_runs, left

    async def _fail_units_of_dead_workers(self, now: datetime, units_alive: UnitsAlive) -> int:
        """Users a stopped (or crashed) server left to their workers, whose worker has since
        died: nobody waits for them any more, so fail them here and free their locks. A unit
        runs at most a day (the longest `timeout_seconds`), so older runs are not looked at.
        Returns how many are still alive (to be looked at again)."""
        left = await self._runs.running_users_of_stopped_runs(now - timedelta(days=1, hours=1))
        by_run: dict[str, list[tuple[str, str]]] = {}
        for run_id, task_name, user_id in left:
            by_run.setdefault(run_id, []).append((task_name, user_id))
        still_alive = 0
        for run_id, users in by_run.items():
            alive = await units_alive(run_id, [user_id for _, user_id in users])
            still_alive += len(alive)
            for task_name, user_id in users:
                if user_id not in alive:
                    log.warning("worker_lost", run_id=run_id, user_id=user_id)
                    # its run has ended: nothing would start a retry
                    await self._runs.end_unit(
                        run_id,
                        task_name,
                        user_id,
                        UnitEnd(EndReason.WORKER_LOST, "worker lost after the server stopped"),
                        now,
                        policy=NO_RETRIES,
                        running_only=False,
                    )
        return still_alive

    # --- replicas and the loop ------------------------------------------------------------

    async def _heartbeat(self, now: datetime) -> None:
        await self._store.replica_heartbeat(self.replica_id, now)
        for run_id in self._coordinator.active_runs:
            await self._runs.heartbeat(run_id, now)

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
            self._next_wake = wake
            await sleep_until_or(self._clock, wake, self._wake)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self.run_forever(), name="ralph-scheduler")

    async def stop(self) -> None:
        await cancel_and_wait(self._loop_task)
        self._loop_task = None
