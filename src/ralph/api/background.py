"""Background tasks and their runs: `/background/...`."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field

from ralph.api.deps import ServicesDep
from ralph.api.params import TaskNamePath, UserIdPath
from ralph.background.cron import never_fires_reason, next_slot
from ralph.background.models import (
    CronTrigger,
    RunStatus,
    StoredTask,
    TaskDefinition,
    TaskRun,
    TriggerType,
    UserResult,
    UserStatus,
)
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


class UserResultOut(BaseModel):
    user_id: str
    position: int
    status: UserStatus
    attempts: int
    started_at: datetime | None
    completed_at: datetime | None
    turns_used: int
    tool_calls: int
    proposals_created: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    error: str | None
    rate_limit_wait_seconds: float = Field(
        description="Time the agent waited for the model rate limit (not part of its timeout)"
    )
    tokens_estimated: bool = Field(
        description="The provider reported no usage: tokens estimated from the text"
    )
    cost_usd: float | None = Field(description="As the provider reported it (OpenRouter)")

    @classmethod
    def of(cls, result: UserResult) -> UserResultOut:
        return cls.model_validate(result, from_attributes=True)


class UserDetailOut(UserResultOut):
    run_id: str
    transcript: list[dict[str, Any]]

    @classmethod
    def detail(cls, result: UserResult) -> UserDetailOut:
        data = UserResultOut.of(result).model_dump()
        transcript: list[dict[str, Any]] = json.loads(result.transcript or "[]")
        return cls(**data, run_id=result.run_id, transcript=transcript)


class RunOut(BaseModel):
    id: str
    task_name: str
    trigger_type: TriggerType
    status: RunStatus
    slot_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    cancel_requested: bool
    user_total: int
    counts: dict[str, int]
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: float | None = Field(description="The users' costs summed (None: not reported)")
    error: str | None
    rerun_of: str | None = Field(
        default=None, description="For a `rerun`: the interrupted run whose users it runs."
    )
    user_results: list[UserResultOut] | None = None

    @classmethod
    def of(cls, run: TaskRun, users: list[UserResult] | None = None) -> RunOut:
        data = {k: getattr(run, k) for k in cls.model_fields if k != "user_results"}
        results = [UserResultOut.of(u) for u in users] if users is not None else None
        return cls(**data, user_results=results)


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
    """Delete the task; its runs stay readable."""
    await services.registry.delete(name)
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
    task = (await services.registry.get(name)).definition
    user_ids = request.user_ids if request else None
    run_id = await services.executor.create_run(task, TriggerType.MANUAL, user_ids)
    job = services.executor.start(run_id)
    if wait:
        done, _ = await asyncio.wait({job}, timeout=services.settings.wait_max_seconds)
        if done:
            finished = RunOut.of(job.result(), await services.runs.users(run_id, limit=100))
            return JSONResponse(finished.model_dump(mode="json"), status_code=200)
    started = RunStarted(run_id=run_id, status=RunStatus.PENDING, message=f"task '{name}' started")
    return JSONResponse(started.model_dump(mode="json"), status_code=202)


@router.get("/tasks/{name}/runs", response_model=list[RunOut])
async def list_runs(
    name: TaskNamePath,
    services: ServicesDep,
    limit: int = Query(default=50, ge=1, le=500),
    status: RunStatus | None = None,
) -> list[RunOut]:
    """The task's runs, newest first, with per-status user counts."""
    return [RunOut.of(r) for r in await services.runs.list(name, status=status, limit=limit)]


@router.get("/runs/{run_id}", response_model=RunOut)
async def get_run(
    run_id: str,
    services: ServicesDep,
    users_offset: int = Query(default=0, ge=0, le=MAX_INT32),
    users_limit: int = Query(default=100, ge=0, le=1000),
    users_status: UserStatus | None = None,
) -> RunOut:
    """A run with a page of its per-user results (in list order)."""
    run = await services.runs.get(run_id)
    users = await services.runs.users(
        run_id, offset=users_offset, limit=users_limit, status=users_status
    )
    return RunOut.of(run, users)


@router.get("/runs/{run_id}/users/{user_id}", response_model=UserDetailOut)
async def get_run_user(run_id: str, user_id: UserIdPath, services: ServicesDep) -> UserDetailOut:
    """One user's result with the agent's transcript (messages, tool calls and results)."""
    return UserDetailOut.detail(await services.runs.user(run_id, user_id))


@router.post("/runs/{run_id}/cancel", response_model=RunOut)
async def cancel_run(run_id: str, services: ServicesDep) -> RunOut:
    """Cancel: running agents are stopped, pending users are marked `cancelled`."""
    return RunOut.of(await services.executor.cancel(run_id))


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
    now = services.clock.now()
    scheduler = services.scheduler
    tasks: list[SchedulerTask] = []
    for stored in await services.registry.list():
        trigger = stored.definition.trigger
        if not stored.definition.enabled:
            continue
        upcoming = (
            next_slot(trigger.schedule, trigger.timezone, max(now, stored.schedule_from))
            if isinstance(trigger, CronTrigger)
            else None
        )
        name = stored.definition.name
        error = scheduler.errors.get(name)
        if isinstance(trigger, CronTrigger) and upcoming is None:
            error = never_fires_reason(trigger.schedule, now)
        tasks.append(
            SchedulerTask(name=name, trigger_type=trigger.type, next_fire_at=upcoming, error=error)
        )
    replicas = await scheduler.replicas(now - timedelta(minutes=10))
    return SchedulerOut(
        replica_id=scheduler.replica_id,
        running=services.settings.scheduler_enabled,
        last_tick_at=scheduler.last_tick,
        recovery_error=scheduler.recovery_error,
        tasks=tasks,
        replicas=replicas,
    )
