"""Background use cases as the API and the CLI ask for them: run a task now (and wait for it),
read runs and their users, cancel, the scheduler's view of what fires next."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from ralph.background.chain_store import ChainStore
from ralph.background.coordinator import RunCoordinator
from ralph.background.models import (
    FINISHED_RUN,
    Attempt,
    RunStatus,
    TaskDefinition,
    TaskRun,
    TriggerType,
    UserResult,
    UserStatus,
)
from ralph.background.registry import TaskRegistry
from ralph.background.run_store import RunStore
from ralph.background.scheduler import Scheduler
from ralph.background.stats import StatsStore, TaskStats
from ralph.background.triggers.after import chain_order, check_chains
from ralph.background.triggers.base import Upcoming
from ralph.clock import Clock
from ralph.errors import Conflict, InvalidInput, NotFound


@dataclass(frozen=True, slots=True)
class TaskSchedule:
    name: str
    trigger_type: str
    next_fire_at: datetime | None
    error: str | None


@dataclass(frozen=True, slots=True)
class TaskChange:
    name: str
    action: Literal["created", "updated", "unchanged", "deleted"]


@dataclass(frozen=True, slots=True)
class SchedulerState:
    replica_id: str
    last_tick_at: datetime | None
    recovery_error: str | None
    tasks: list[TaskSchedule]
    replicas: list[dict[str, Any]]


class BackgroundService:
    def __init__(
        self,
        *,
        registry: TaskRegistry,
        runs: RunStore,
        coordinator: RunCoordinator,
        scheduler: Scheduler,
        chains: ChainStore,
        stats: StatsStore,
        clock: Clock,
    ) -> None:
        self._registry = registry
        self._chains = chains
        self._stats = stats
        self._runs = runs
        self._coordinator = coordinator
        self._scheduler = scheduler
        self._clock = clock

    async def create_run(
        self,
        task: TaskDefinition,
        trigger: TriggerType,
        user_ids: Sequence[str] | None = None,
        *,
        dry_run: bool = False,
    ) -> str:
        """Record a pending run for `user_ids` (default: all the task's users; any others are
        InvalidInput) and return its id; the coordinator's `start` runs it. A `dry_run`'s
        agents run for real, but their proposals are previews (never applicable) and no later
        run counts it as the task having run for its users."""
        users = list(task.user_ids if user_ids is None else user_ids)
        if user_ids is not None:
            allowed = set(task.user_ids)
            outside = [u for u in users if u not in allowed]
            if outside:
                raise InvalidInput(f"user ids not in task '{task.name}': {', '.join(outside[:5])}")
        run_id = await self._runs.create(task, trigger, users, self._clock.now(), dry_run=dry_run)
        assert run_id is not None  # only a slot claim can lose, and this run claims none
        return run_id

    async def run_now(
        self,
        name: str,
        user_ids: Sequence[str] | None,
        wait_seconds: float | None,
        *,
        dry_run: bool = False,
    ) -> tuple[str, TaskRun | None]:
        """Start a manual run (or a dry run) of the task; with `wait_seconds`, wait that long
        at most for it to finish. Returns its id and, if it finished, the finished run."""
        task = (await self._registry.get(name)).definition
        run_id = await self.create_run(task, TriggerType.MANUAL, user_ids, dry_run=dry_run)
        self._coordinator.start(run_id)
        finished = None
        if wait_seconds is not None:
            finished = await self._coordinator.wait(run_id, wait_seconds)
        return run_id, finished

    async def retry(self, run_id: str, user_ids: Sequence[str] | None) -> str:
        """Start a `retry` run of the users `run_id` ended `failed` (default: all of them) or,
        when listed, `budget_exceeded`, with the task's current definition, now. Conflict
        while the run still runs; NotFound for a user not in it; InvalidInput for one that
        did not end so, or none to retry."""
        run = await self._runs.get(run_id)
        if run.status not in FINISHED_RUN:
            raise Conflict(f"run '{run_id}' is still {run.status.value}: retry it once it ends")
        if user_ids is None:
            users = await self._runs.user_ids(run_id, UserStatus.FAILED)
            if not users:
                raise InvalidInput(f"run '{run_id}' has no failed users to retry")
        else:
            users = list(dict.fromkeys(user_ids))
            ended = {u.user_id: u.status for u in await self._runs.users_named(run_id, users)}
            unknown = [u for u in users if u not in ended]
            if unknown:
                raise NotFound(f"not users of run '{run_id}': {', '.join(unknown[:5])}")
            eligible = (UserStatus.FAILED, UserStatus.BUDGET_EXCEEDED)
            others = [f"{u} ({ended[u].value})" for u in users if ended[u] not in eligible]
            if others:
                raise InvalidInput(
                    "only users that ended failed or budget_exceeded can be retried: "
                    + ", ".join(others[:5])
                )
        task = (await self._registry.get(run.task_name)).definition
        retry_id = await self._runs.create(
            task,
            TriggerType.RETRY,
            users,
            self._clock.now(),
            dry_run=run.dry_run,
            retry_of=run_id,
        )
        assert retry_id is not None  # it claims no slot
        self._coordinator.start(retry_id)
        return retry_id

    async def runs(self, name: str, status: RunStatus | None, limit: int) -> list[TaskRun]:
        """The task's runs, newest first: those of this task, not of an earlier task of the
        same name that was deleted (they stay readable by id)."""
        stored = await self._registry.get(name)
        return await self._runs.list(
            name, status=status, limit=limit, created_since=stored.created_at
        )

    async def delete(self, name: str) -> None:
        """Delete the task and cancel its runs still pending or running (their users end
        `cancelled`); its runs stay readable by id."""
        await self._registry.delete(name)
        for status in (RunStatus.PENDING, RunStatus.RUNNING):
            for run in await self._runs.list(name, status=status, limit=10_000):
                with contextlib.suppress(Conflict):  # it finished meanwhile
                    await self._coordinator.cancel(run.id)

    async def run(
        self,
        run_id: str,
        *,
        users_offset: int = 0,
        users_limit: int = 100,
        users_status: UserStatus | None = None,
    ) -> tuple[TaskRun, list[UserResult]]:
        """A run with a page of its users' results, in list order."""
        run = await self._runs.get(run_id)
        users = await self._runs.users(
            run_id, offset=users_offset, limit=users_limit, status=users_status
        )
        return run, users

    async def stats(self, name: str, days: int) -> TaskStats:
        """The task's quality over its last `days` days (`ralph.background.stats`)."""
        stored = await self._registry.get(name)
        return await self._stats.task_stats(name, days, self._clock.now(), stored.created_at)

    async def upstream_runs(self, run_id: str) -> list[str]:
        """For an `after` run: the upstream runs whose results started it."""
        return await self._chains.upstream_runs(run_id)

    async def runs_of_user(self, user_id: str, limit: int = 20) -> list[tuple[str, UserResult]]:
        """(task, result) of the user's most recent runs, newest first."""
        return await self._runs.of_user(user_id, limit)

    async def run_user(self, run_id: str, user_id: str) -> UserResult:
        return await self._runs.user(run_id, user_id)

    async def attempts(self, run_id: str, user_id: str) -> list[Attempt]:
        return await self._runs.attempts(run_id, user_id)

    async def cancel(self, run_id: str) -> TaskRun:
        return await self._coordinator.cancel(run_id)

    async def apply(
        self, tasks: Sequence[TaskDefinition], *, prune: bool = False, dry_run: bool = False
    ) -> list[TaskChange]:
        """Make the stored tasks match `tasks`: create the new ones, replace the changed ones,
        leave the unchanged ones alone (their schedules do not restart), and with `prune`
        delete the tasks `tasks` does not name. Every task is checked before anything is
        written (InvalidInput names the task); `dry_run` only reports."""
        names = [task.name for task in tasks]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidInput(f"tasks named more than once: {', '.join(twice)}")
        for task in tasks:
            try:
                self._registry.check(task)
            except InvalidInput as exc:
                raise InvalidInput(f"task '{task.name}': {exc}") from None
        stored = {s.definition.name: s.definition for s in await self._registry.list()}
        pruned = sorted(set(stored) - set(names)) if prune else []
        after = {**{n: t for n, t in stored.items() if n not in pruned}}
        after.update({task.name: task for task in tasks})
        check_chains(after)
        changes: list[TaskChange] = []
        for task in tasks:
            current = stored.get(task.name)
            action = "created" if current is None else "updated" if current != task else None
            changes.append(TaskChange(task.name, action or "unchanged"))
        changes += [TaskChange(name, "deleted") for name in pruned]
        if dry_run:
            return changes
        # each task after the one it follows, so every write leaves a valid set of tasks;
        # deletions the other way round
        for task in chain_order(tasks):
            current = stored.get(task.name)
            if current is None:
                await self._registry.create(task)
            elif current != task:
                await self._registry.replace(task)
        for task in reversed(chain_order([stored[name] for name in pruned])):
            await self.delete(task.name)
        return changes

    async def definitions(self, names: Sequence[str]) -> list[TaskDefinition]:
        """The named tasks' definitions (all, if none is named), by name."""
        if names:
            return [(await self._registry.get(name)).definition for name in names]
        return sorted((s.definition for s in await self._registry.list()), key=lambda t: t.name)

    async def upcoming(self, name: str, limit: int) -> Upcoming:
        """What the task does next, as its trigger kind says: the next `limit` fire times
        (cron), how many users are armed and when the first can be due (idle), how many
        users wait for it (after)."""
        stored = await self._registry.get(name)
        kind = self._scheduler.kind(stored.definition.trigger.type)
        return await kind.upcoming(stored, self._clock.now(), limit)

    async def scheduler_state(self) -> SchedulerState:
        """Each enabled task's next fire time, this replica's last tick, replicas seen in the
        last 10 minutes."""
        now = self._clock.now()
        tasks: list[TaskSchedule] = []
        for stored in await self._registry.list():
            trigger = stored.definition.trigger
            if not stored.definition.enabled:
                continue
            name = stored.definition.name
            upcoming = await self._scheduler.kind(trigger.type).next_fire(stored, now)
            error = upcoming.error or self._scheduler.errors.get(name)
            tasks.append(TaskSchedule(name, trigger.type, upcoming.at, error))
        return SchedulerState(
            replica_id=self._scheduler.replica_id,
            last_tick_at=self._scheduler.last_tick,
            recovery_error=self._scheduler.recovery_error,
            tasks=tasks,
            replicas=await self._scheduler.replicas(now - timedelta(minutes=10)),
        )
