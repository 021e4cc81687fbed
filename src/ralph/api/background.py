"""Background tasks and their runs: `/background/...`."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field

from ralph.api.deps import ServicesDep
from ralph.api.params import TaskNamePath, UserIdPath
from ralph.api.schema import response_model
from ralph.background.models import (
    Attempt,
    RunStatus,
    StoredTask,
    TaskDefinition,
    TaskRun,
    TriggerType,
    UserResult,
    UserStatus,
)
from ralph.background.service import TaskChange
from ralph.background.stats import DayStats, LabelStats, TaskStats
from ralph.background.triggers.base import Fire, Upcoming
from ralph.errors import InvalidInput
from ralph.validation import MAX_INT32, StrictInput, UserId, unique_user_ids

router = APIRouter(prefix="/background", tags=["background"])


class TaskOut(TaskDefinition):
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, stored: StoredTask) -> TaskOut:
        # the definition was validated when it was written: not again (100,000 user ids)
        return cls.model_construct(
            **dict(stored.definition), created_at=stored.created_at, updated_at=stored.updated_at
        )


class RunRequest(StrictInput):
    user_ids: (
        Annotated[list[UserId], AfterValidator(unique_user_ids), Field(min_length=1)] | None
    ) = Field(
        default=None,
        description="Run only these users (each must be in the task's list); omit for all.",
    )
    dry_run: bool = Field(
        default=False,
        description=(
            "Run the agents for real, but record their proposals as previews attached to the "
            "run (`GET /proposals?run_id=...`: not in the review queue, never applicable); "
            "later runs do not count it as the task having run for its users."
        ),
    )


_USER_NOTES = {
    "rate_limit_wait_seconds": (
        "Time the agent waited for the model rate limit (not part of its timeout)"
    ),
    "tokens_estimated": "The provider reported no usage: tokens estimated from the text",
    "cost_usd": "As the provider reported it (OpenRouter)",
    "jitter_seconds": "A cron run's start delay for this user after the slot (task jitter)",
    "stopped_by": (
        "What stopped the agent before it finished: max_turns, timeout or budget. A `success` "
        "with it made proposals, then ran out; a `failed` with it did nothing first."
    ),
    "reason": (
        "Why the unit ended: finished, rate_limited, timeout, provider_error, invalid_reply, "
        "budget_exceeded, max_turns, cancelled, worker_lost, interrupted or internal (for a "
        "`retrying` user: why its latest attempt did)"
    ),
    "attempts": "Attempts started so far (each is listed by .../attempts)",
    "next_attempt_at": "`retrying`: when the next attempt is due (a cron jitter's start too)",
    "proposals_refused": (
        "Changes its agent proposed that a reviewer had rejected before: not created again"
    ),
}
UserResultOut = response_model(
    UserResult,
    "UserResultOut",
    exclude=frozenset({"run_id", "transcript"}),
    descriptions=_USER_NOTES,
)
UserDetailOut = response_model(
    UserResult,
    "UserDetailOut",
    exclude=frozenset({"transcript"}),
    descriptions=_USER_NOTES,
    extra={"transcript": (list[dict[str, Any]], ...)},
)
RunOut = response_model(
    TaskRun,
    "RunOut",
    exclude=frozenset({"heartbeat_at", "owner"}),
    descriptions={
        "cost_usd": "The users' costs summed (None: not reported)",
        "rerun_of": "For a `rerun`: the interrupted run whose users it runs.",
        "retry_of": "For a `retry`: the run whose failed users it runs again.",
        "dry_run": "Its proposals are previews (never applicable)",
    },
    extra={
        "user_results": (list[UserResultOut] | None, None),
        "upstream_run_ids": (
            list[str] | None,
            Field(
                default=None,
                description="For an `after` run (one run read by id): the upstream task's "
                "runs whose results started it.",
            ),
        ),
    },
)


def run_out(run: TaskRun, users: list[UserResult] | None = None) -> dict[str, Any]:
    """A run as `RunOut` shows it, with a page of its users' results if given."""
    return {**dataclasses.asdict(run), "user_results": users}


class RunStarted(BaseModel):
    run_id: str
    status: RunStatus
    message: str


@router.get("/tasks", response_model=list[TaskOut])
async def list_tasks(services: ServicesDep) -> list[TaskOut]:
    return [TaskOut.of(t) for t in await services.registry.list()]


@router.post("/tasks", response_model=TaskOut, status_code=201)
async def create_task(task: TaskDefinition, services: ServicesDep) -> TaskOut:
    """Create a task (409 if the name exists; PUT replaces). Starts at its next slot."""
    return TaskOut.of(await services.registry.create(task))


class ApplyIn(StrictInput):
    tasks: list[TaskDefinition] = Field(max_length=1000, description="The tasks to have.")
    prune: bool = Field(default=False, description="Delete the tasks not in `tasks`.")
    dry_run: bool = Field(default=False, description="Report what would change; change nothing.")


TaskChangeOut = response_model(TaskChange, "TaskChangeOut")


@router.post("/tasks/apply", response_model=list[TaskChangeOut])
async def apply_tasks(payload: ApplyIn, services: ServicesDep) -> list[TaskChange]:
    """Create or replace each task given, leave unchanged ones alone (their schedules do not
    restart); with `prune`, delete the others. Every task is checked before anything is
    written. `ralph tasks apply -f tasks.toml` sends a file's tasks here."""
    return await services.background.apply(
        payload.tasks, prune=payload.prune, dry_run=payload.dry_run
    )


@router.get("/tasks/{name}", response_model=TaskOut)
async def get_task(name: TaskNamePath, services: ServicesDep) -> TaskOut:
    return TaskOut.of(await services.registry.get(name))


@router.put("/tasks/{name}", response_model=TaskOut)
async def replace_task(name: TaskNamePath, task: TaskDefinition, services: ServicesDep) -> TaskOut:
    if task.name != name:
        raise InvalidInput(f"body names task '{task.name}' but the URL names '{name}'")
    return TaskOut.of(await services.registry.replace(task))


@router.delete("/tasks/{name}")
async def delete_task(name: TaskNamePath, services: ServicesDep) -> dict[str, bool]:
    """Delete the task; its runs still going are cancelled; all stay readable by id."""
    await services.background.delete(name)
    return {"deleted": True}


@router.post("/tasks/{name}/enable", response_model=TaskOut)
async def enable_task(name: TaskNamePath, services: ServicesDep) -> TaskOut:
    return TaskOut.of(await services.registry.set_enabled(name, True))


@router.post("/tasks/{name}/disable", response_model=TaskOut)
async def disable_task(name: TaskNamePath, services: ServicesDep) -> TaskOut:
    return TaskOut.of(await services.registry.set_enabled(name, False))


@router.post(
    "/tasks/{name}/run",
    status_code=202,
    response_model=RunStarted,
    responses={200: {"model": RunOut, "description": "with ?wait=true, the finished run"}},
)
async def run_task(
    name: TaskNamePath,
    services: ServicesDep,
    request: RunRequest | None = None,
    wait: bool = Query(default=False, description="Wait for the run to finish (bounded)."),
) -> JSONResponse:
    """Start a manual run now; 202 with the run id. `?wait=true` returns the finished run
    (or 202 if it is still running after RALPH_WAIT_MAX_SECONDS)."""
    run_id, finished = await services.background.run_now(
        name,
        request.user_ids if request else None,
        services.settings.wait_max_seconds if wait else None,
        dry_run=request.dry_run if request else False,
    )
    if finished is not None:
        _, users = await services.background.run(run_id, users_limit=100)
        body = RunOut.model_validate(run_out(finished, users)).model_dump(mode="json")
        return JSONResponse(body, status_code=200)
    what = "dry run" if request and request.dry_run else "run"
    started = RunStarted(
        run_id=run_id, status=RunStatus.PENDING, message=f"task '{name}' {what} started"
    )
    return JSONResponse(started.model_dump(mode="json"), status_code=202)


FireOut = response_model(
    Fire,
    "FireOut",
    descriptions={"at": "The instant (UTC)", "users": "How many users the run will have"},
)
DayStatsOut = response_model(DayStats, "DayStatsOut")
LabelStatsOut = response_model(LabelStats, "LabelStatsOut")
TaskStatsOut = response_model(
    TaskStats,
    "TaskStatsOut",
    extra={"per_day": (list[DayStatsOut], ...), "per_label": (list[LabelStatsOut], ...)},
)
UpcomingOut = response_model(
    Upcoming,
    "UpcomingOut",
    descriptions={
        "fires": "Cron: the next fire times, soonest first",
        "armed_users": "Idle: users with a message since their last episode",
        "next_due_at": (
            "Idle: the earliest time one of them can be due; after: the earliest time a "
            "waiting user is due (UTC)"
        ),
        "follows": "After: the task this one follows",
        "waiting_users": "After: users whose upstream result this task has not followed yet",
    },
    extra={"fires": (list[FireOut], ...)},
)


@router.get("/tasks/{name}/upcoming", response_model=UpcomingOut)
async def upcoming(
    name: TaskNamePath,
    services: ServicesDep,
    limit: int = Query(default=5, ge=1, le=100, description="How many cron fire times"),
) -> dict[str, Any]:
    """What the task does next: its next fire times (cron), or how many users are armed and
    the earliest due time (idle)."""
    return dataclasses.asdict(await services.background.upcoming(name, limit))


@router.get("/tasks/{name}/stats", response_model=TaskStatsOut)
async def task_stats(
    name: TaskNamePath,
    services: ServicesDep,
    days: int = Query(default=30, ge=1, le=366, description="How many days, up to today (UTC)"),
) -> dict[str, Any]:
    """The task's quality at a glance, per day (UTC, oldest first, every day listed) and per
    block: users run by status, its agents' proposals by outcome (`approved`,
    `approved_with_edits`, `rejected`, `superseded`, `expired`, `conflict`, `pending`; by the
    day they were made), `approval_rate` (approved, edited or not, over approved and
    rejected; null when none was decided), tokens and cost (by the day the run was created).
    Dry runs are not counted."""
    return dataclasses.asdict(await services.background.stats(name, days))


@router.get("/tasks/{name}/runs", response_model=list[RunOut])
async def list_runs(
    name: TaskNamePath,
    services: ServicesDep,
    limit: int = Query(default=50, ge=1, le=500),
    status: RunStatus | None = None,
) -> list[dict[str, Any]]:
    """The task's runs, newest first, with per-status user counts."""
    return [run_out(r) for r in await services.background.runs(name, status, limit)]


@router.get("/runs/{run_id}", response_model=RunOut)
async def get_run(
    run_id: str,
    services: ServicesDep,
    users_offset: int = Query(default=0, ge=0, le=MAX_INT32),
    users_limit: int = Query(default=100, ge=0, le=1000),
    users_status: UserStatus | None = None,
) -> dict[str, Any]:
    """A run with a page of its per-user results (in list order)."""
    run, users = await services.background.run(
        run_id, users_offset=users_offset, users_limit=users_limit, users_status=users_status
    )
    upstream = None
    if run.trigger_type is TriggerType.AFTER:
        upstream = await services.background.upstream_runs(run_id)
    return {**run_out(run, users), "upstream_run_ids": upstream}


@router.get("/runs/{run_id}/users/{user_id}", response_model=UserDetailOut)
async def get_run_user(run_id: str, user_id: UserIdPath, services: ServicesDep) -> dict[str, Any]:
    """One user's result with the agent's transcript (messages, tool calls and results)."""
    result = await services.background.run_user(run_id, user_id)
    return {**dataclasses.asdict(result), "transcript": json.loads(result.transcript or "[]")}


RetryUsers = Annotated[list[UserId], AfterValidator(unique_user_ids), Field(min_length=1)]


class RetryRequest(StrictInput):
    user_ids: (
        Annotated[list[UserId], AfterValidator(unique_user_ids), Field(min_length=1)] | None
    ) = Field(
        default=None,
        max_length=1_000_000,
        description=(
            "Users to run again (each ended failed or budget_exceeded). Default: every user "
            "of the run that ended failed."
        ),
    )


@router.post("/runs/{run_id}/retry", status_code=202, response_model=RunStarted)
async def retry_run(
    run_id: str, services: ServicesDep, request: RetryRequest | None = None
) -> RunStarted:
    """Run a finished run's failed users again, now, in a new run (`trigger_type` "retry",
    `retry_of` this run), with the task's current definition. 409 while the run still runs;
    404 for a user not in it; 422 for one that did not fail, or when none did."""
    retry_id = await services.background.retry(run_id, request.user_ids if request else None)
    return RunStarted(
        run_id=retry_id, status=RunStatus.PENDING, message=f"retry of run '{run_id}' started"
    )


AttemptOut = response_model(
    Attempt,
    "AttemptOut",
    exclude=frozenset({"transcript"}),
    descriptions={
        "reason": "Why the attempt ended (None: it is running)",
        "cost_usd": "The attempt's, or (for the latest) the user's across attempts",
    },
    extra={"transcript": (list[dict[str, Any]], ...)},
)


@router.get("/runs/{run_id}/users/{user_id}/attempts", response_model=list[AttemptOut])
async def get_run_user_attempts(
    run_id: str,
    user_id: UserIdPath,
    services: ServicesDep,
    offset: int = Query(default=0, ge=0, le=MAX_INT32),
    limit: int = Query(default=20, ge=1, le=100),
) -> list[dict[str, Any]]:
    """The user's attempts in the run, oldest first, each with its transcript: those that
    were retried, then the latest (running, or the user's result)."""
    attempts = await services.background.attempts(run_id, user_id)
    return [
        {**dataclasses.asdict(a), "transcript": json.loads(a.transcript or "[]")}
        for a in attempts[offset : offset + limit]
    ]


@router.post("/runs/{run_id}/cancel", response_model=RunOut)
async def cancel_run(run_id: str, services: ServicesDep) -> dict[str, Any]:
    """Cancel: running agents are stopped, pending users are marked `cancelled`."""
    return run_out(await services.background.cancel(run_id))


class SchedulerTask(BaseModel):
    name: str
    trigger_type: str
    next_fire_at: datetime | None
    error: str | None = Field(
        default=None, description="Why the scheduler could not fire this task in its last tick"
    )


class SchedulerOut(BaseModel):
    replica_id: str
    running: bool
    last_tick_at: datetime | None
    recovery_error: str | None = None
    tasks: list[SchedulerTask]
    replicas: list[dict[str, Any]]


@router.get("/scheduler", response_model=SchedulerOut)
async def scheduler_state(services: ServicesDep) -> SchedulerOut:
    """Each enabled task's next fire time, this replica's last tick, replicas seen recently."""
    state = await services.background.scheduler_state()
    return SchedulerOut(
        replica_id=state.replica_id,
        running=services.settings.scheduler_enabled,
        last_tick_at=state.last_tick_at,
        recovery_error=state.recovery_error,
        tasks=[SchedulerTask.model_validate(t, from_attributes=True) for t in state.tasks],
        replicas=state.replicas,
    )
