"""Decides when tasks run, exactly once across replicas: each trigger kind's module (in
`ralph.background.triggers`) says what fires now; this loop asks each enabled task's, starts
the runs, recovers crashed ones and keeps the replica's heartbeat.

Every firing is claimed in the database before anything runs (a cron slot by the unique
(task, slot key) of its run row, an idle episode by a conditional write to its `idle_state`
row, a followed result by its `task_chain_claims` row). A replica that loses a claim does
nothing, so any number of replicas can tick at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from ralph.aio import cancel_and_wait
from ralph.background.chain_store import ChainStore
from ralph.background.coordinator import RunCoordinator
from ralph.background.models import NO_RETRIES, UserStatus
from ralph.background.registry import TaskRegistry
from ralph.background.run_store import RunStore, UnitEnd
from ralph.background.schedule_store import ScheduleStore
from ralph.background.triggers.after import AfterKind
from ralph.background.triggers.base import TriggerKind
from ralph.background.triggers.cron import CronKind
from ralph.background.triggers.idle import IdleKind
from ralph.clock import Clock, sleep_until_or
from ralph.reasons import EndReason
from ralph.users.store import ProfileStore

log = structlog.get_logger(__name__)

# a task (or recovery) that failed in a tick is tried again this soon
_RETRY_FAILED = timedelta(seconds=30)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


# (run id, user ids) -> those of the users whose unit a live worker process is running
UnitsAlive = Callable[[str, Sequence[str]], Awaitable[set[str]]]


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
        chains: ChainStore,
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
        self._idle = IdleKind(store=store, idle_interval=self._idle_interval)
        self._after = AfterKind(chains=chains, idle_interval=self._idle_interval)
        self._kinds: dict[str, TriggerKind] = {
            "cron": CronKind(runs=runs, profiles=profiles),
            "idle": self._idle,
            "after": self._after,
        }
        self.replica_id = coordinator.owner
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.last_tick: datetime | None = None
        # what `note_activity` and `note_result` compare with: the loop's planned wake
        self._next_wake: datetime | None = None
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
        for kind in self._kinds.values():
            kind.begin_pass(tasks)
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
                fired = await self.kind(stored.definition.trigger.type).fire(stored, now)
            except Exception as exc:
                log.exception("scheduler_task_failed", task=name)
                self.errors[name] = _describe(exc)
                wake = min(wake, now + _RETRY_FAILED)
                continue
            for run_id in fired.run_ids:
                self._coordinator.start(run_id)
            started += fired.run_ids
            if fired.next_check is None:
                self.errors[name] = fired.error or "nothing will fire it"
            else:
                self.errors.pop(name, None)
                wake = min(wake, fired.next_check)
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

    def kind(self, trigger_type: str) -> TriggerKind:
        """The module that answers for a kind of trigger."""
        return self._kinds[trigger_type]

    @property
    def idle(self) -> IdleKind:
        return self._idle

    def note_activity(self, user_id: str, at: datetime) -> None:
        """A user was active `at` (recorded through this process): if that makes an idle
        episode due before the loop's next wake, wake it to plan again."""
        self._wake_by(self._idle.note_activity(user_id, at))

    def note_result(self, task_name: str, at: datetime) -> None:
        """A unit of `task_name` ended `at` here: if a task that follows it is due before
        the loop's next wake, wake it to plan again."""
        self._wake_by(self._after.note_result(task_name, at))

    def _wake_by(self, due: datetime | None) -> None:
        if due is not None and self._next_wake is not None and due < self._next_wake:
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
            # cleared before the pass: a change made during it wakes the next one at once
            self._wake.clear()
            try:
                report = await self.tick()
                wake = report.next_wake
            except Exception:
                log.exception("scheduler_tick_failed")
                wake = self._clock.now() + timedelta(seconds=5)
            self._next_wake = wake
            await sleep_until_or(self._clock, wake, self._wake)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self.run_forever(), name="ralph-scheduler")

    async def stop(self) -> None:
        await cancel_and_wait(self._loop_task)
        self._loop_task = None
