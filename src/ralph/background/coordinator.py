"""Runs a task for its users: at most `batch_size` units in flight, each slot refilled as it
frees (a sliding window), the run's lease kept fresh, cancels and shutdowns passed on to
wherever the units execute (this process, its agent process or ARQ workers: a `Dispatch`)."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import structlog

from ralph.aio import cancel_and_wait
from ralph.background.dispatch import Dispatch
from ralph.background.inflight import InFlight
from ralph.background.models import (
    RunStatus,
    TaskDefinition,
    TaskRun,
    TriggerType,
    UserStatus,
)
from ralph.background.run_store import RERUN_PREFIX, RunStore
from ralph.clock import Clock
from ralph.db.retry import until_reachable

log = structlog.get_logger(__name__)


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RunCoordinator:
    """Creates, starts, cancels and finishes runs; the units are the `dispatch`'s."""

    def __init__(
        self,
        *,
        runs: RunStore,
        dispatch: Dispatch,
        inflight: InFlight,
        clock: Clock,
        heartbeat_seconds: float = 5.0,
        owner: str | None = None,
        rerun_limit: int = 1,
    ) -> None:
        """`inflight` holds the cancel marks and token counters of this process's runs (shared
        with the unit runner when units run here). Users a crash or a shutdown interrupts are
        re-run in a new run, `rerun_limit` times in a row at most."""
        self._runs = runs
        self._dispatch = dispatch
        self._inflight = inflight
        self._clock = clock
        self._heartbeat_seconds = heartbeat_seconds
        self.owner = owner or replica_id()
        self._rerun_limit = rerun_limit
        self._active: dict[str, asyncio.Task[TaskRun]] = {}
        self._stopping = False
        # set on a shutdown or a cancel: runs waiting for a user's jittered start look again
        self._interrupted = asyncio.Event()
        # told (task, when) each time a unit of a run here ends (a task following it may be due)
        self.on_unit_end: Callable[[str, datetime], None] = lambda _task, _at: None

    # --- starting runs --------------------------------------------------------------------

    async def create_rerun(
        self, run_id: str, task: TaskDefinition, user_ids: Sequence[str]
    ) -> str | None:
        """Record a pending run of `user_ids` that a crash or a shutdown left unfinished in
        `run_id`. At most one per interrupted run (keyed on it), and no deeper than the rerun
        limit (a user that keeps killing its process is not re-run forever): None if none
        was made."""
        if not user_ids:
            return None
        if await self._runs.rerun_depth(run_id, self._rerun_limit) >= self._rerun_limit:
            return None
        return await self._runs.create(
            task,
            TriggerType.RERUN,
            list(user_ids),
            self._clock.now(),
            slot_key=f"{RERUN_PREFIX}{run_id}",
            dry_run=await self._runs.is_dry_run(run_id),  # a dry run's rerun previews too
            continues=run_id,
        )

    def start(self, run_id: str) -> asyncio.Task[TaskRun]:
        """Execute a pending run in the background; the returned task finishes with it."""
        task = asyncio.create_task(self.execute(run_id), name=f"run:{run_id}")
        self._active[run_id] = task
        task.add_done_callback(lambda _: self._active.pop(run_id, None))
        return task

    async def wait(self, run_id: str, seconds: float | None = None) -> TaskRun | None:
        """The run once it finished here, or None if it is not running here or `seconds`
        passed first."""
        job = self._active.get(run_id)
        if job is None:
            return None
        done, _ = await asyncio.wait({job}, timeout=seconds)
        return job.result() if done else None

    async def drain(self) -> None:
        """Wait until no run is in progress here (runs they start included)."""
        while self._active:
            await asyncio.wait(list(self._active.values()))

    @property
    def dispatch(self) -> Dispatch:
        """Where this coordinator's units execute."""
        return self._dispatch

    @property
    def active_runs(self) -> list[str]:
        return list(self._active)

    async def cancel(self, run_id: str) -> TaskRun:
        """Request cancellation: pending users become `cancelled`, running agents are stopped."""
        run = await self._runs.request_cancel(run_id)
        self._cancel_in_flight(run_id)
        return run

    def _cancel_in_flight(self, run_id: str) -> None:
        self._inflight.cancel(run_id)
        self._dispatch.cancel(run_id)
        self._interrupted.set()
        self._interrupted.clear()

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop starting users; give in-flight agents `grace_seconds`, then stop them (their
        users are marked `interrupted`, as are the run's users not started yet). Those users
        are queued in a pending run, which any replica's recovery starts once the run lease
        has passed (the restarted server's too). Units of ARQ workers are finished by their
        workers; units still queued find their users `interrupted` and do nothing."""
        self._stopping = True
        self._interrupted.set()
        runs = list(self._active.values())
        if not runs:
            return
        _, still_running = await asyncio.wait(runs, timeout=grace_seconds)
        self._inflight.stop_all()
        await self._dispatch.stop()
        if still_running:
            await asyncio.wait(still_running, timeout=10)

    # --- executing ------------------------------------------------------------------------

    async def execute(self, run_id: str) -> TaskRun:
        """Execute a pending run to the end and return its final state."""
        task = await self._runs.snapshot(run_id)
        if not await self._runs.mark_started(run_id, self.owner, self._clock.now()):
            return await self._runs.get(run_id)
        log.info("run_started", run_id=run_id, task=task.name, batch_size=task.batch_size)
        heartbeat = asyncio.create_task(self._heartbeat(run_id))
        error: str | None = None
        try:
            await self._window(run_id, task)
        except Exception as exc:  # a storage failure: record it instead of leaving "running"
            log.exception("run_failed", run_id=run_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            await cancel_and_wait(heartbeat)
            self._inflight.forget(run_id)
        # the end of a run must not be lost to a database outage: wait for it to come back
        run = await until_reachable(lambda: self._runs.get(run_id), what="run")
        leftover = UserStatus.CANCELLED if run.cancel_requested else UserStatus.INTERRUPTED
        if self._stopping or run.cancel_requested or error:
            await until_reachable(
                lambda: self._runs.end_waiting_users(run_id, self._clock.now(), leftover),
                what="run",
            )
        run = await until_reachable(
            lambda: self._runs.finish(run_id, self._clock.now(), error), what="run"
        )
        log.info("run_finished", run_id=run_id, task=task.name, status=run.status, **run.counts)
        if run.status is RunStatus.INTERRUPTED:
            await self._rerun_interrupted(run_id, task)
        return run

    async def _rerun_interrupted(self, run_id: str, task: TaskDefinition) -> None:
        """This server is stopping (the rerun waits for recovery, here or on another
        replica), or a worker stopped mid-unit (the rerun starts now)."""
        users = await self._runs.user_ids(run_id, UserStatus.INTERRUPTED)
        rerun = await self.create_rerun(run_id, task, users)
        if rerun is None:
            return
        log.info("run_rerun_queued", run_id=run_id, rerun_id=rerun, users=len(users))
        if not self._stopping:
            self.start(rerun)

    async def _window(self, run_id: str, task: TaskDefinition) -> None:
        """Start the run's users as they come due (first attempts in list order, retries and
        jittered starts at their time), at most `batch_size` at once, until none is left to
        start: each ended, or the server stops, the run is cancelled, its budget spent."""
        in_flight: dict[asyncio.Task[None], str] = {}
        due: list[str] = []  # due users read and not started yet
        page = max(task.batch_size * 2, 100)
        try:
            while not self._halted(run_id):
                # one time for the reads of an iteration: a user due between them is seen
                now = self._clock.now()
                if not due:
                    started = set(in_flight.values())  # pending until their unit claims them
                    read = await until_reachable(
                        functools.partial(self._runs.due_users, run_id, now, page + len(started)),
                        what="pending users",
                    )
                    due = [user_id for user_id in read if user_id not in started][:page]
                if due and len(in_flight) < task.batch_size:
                    if await self._budget_spent(run_id, task):
                        return
                    user_id = due.pop(0)
                    in_flight[asyncio.create_task(self._dispatch(run_id, task, user_id))] = user_id
                    continue
                until: datetime | None = None
                if not due:
                    waiting, until = await until_reachable(
                        functools.partial(self._runs.waiting, run_id, now),
                        what="pending users",
                    )
                    if not in_flight and not waiting:
                        return
                    if not in_flight and until is None:
                        continue  # one came due since the read
                # a unit ends (its slot frees, or it is to be retried), or the next is due
                ended = await self._wait_for(set(in_flight), until)
                for job in ended:
                    in_flight.pop(job, None)
                if ended:
                    self.on_unit_end(task.name, self._clock.now())
        finally:
            if in_flight:
                await asyncio.wait(in_flight)

    def _halted(self, run_id: str) -> bool:
        return self._stopping or self._inflight.is_cancelled(run_id)

    async def _wait_for(
        self, jobs: set[asyncio.Task[None]], until: datetime | None
    ) -> set[asyncio.Task[None]]:
        """Wait until one of `jobs` ends, the clock reaches `until`, or a stop or a cancel
        (whichever first); returns the jobs ended."""
        waits: set[asyncio.Task[Any]] = set(jobs)
        own: list[asyncio.Task[Any]] = [asyncio.create_task(self._interrupted.wait())]
        if until is not None:
            own.append(asyncio.create_task(self._clock.sleep_until(until)))
        try:
            await asyncio.wait(waits | set(own), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for job in own:
                await cancel_and_wait(job)
        return {job for job in jobs if job.done()}

    async def _budget_spent(self, run_id: str, task: TaskDefinition) -> bool:
        """With the run's token budget spent, nobody else starts: the pending users end
        `budget_exceeded`."""
        tokens = await self._inflight.run_tokens(
            run_id, task, lambda: self._runs.tokens_used(run_id)
        )
        if tokens is None or not tokens.exhausted:
            return False
        await until_reachable(
            lambda: self._runs.end_waiting_users(
                run_id, self._clock.now(), UserStatus.BUDGET_EXCEEDED
            ),
            what="pending users",
        )
        return True

    async def _heartbeat(self, run_id: str) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                # a cancel requested through another replica reaches this one here
                if await self._runs.heartbeat(run_id, self._clock.now()):
                    self._cancel_in_flight(run_id)
            except Exception:  # the database is away: beat again next time
                log.warning("heartbeat_failed", run_id=run_id, exc_info=True)
