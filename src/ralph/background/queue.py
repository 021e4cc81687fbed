"""ARQ worker mode: the (run, user) units of a run executed by worker processes over Redis.

The server keeps the sliding window (it decides what runs, and how many at once); instead of
running an agent itself it enqueues `ralph_run_user(run_id, user_id)` and waits for the worker
to report the unit done. Workers (`ralph worker`, any number, on any machine that reaches the
database, Redis and the model) execute `Executor.run_user`, which reads everything it needs
from the database and records the result there.

Completion comes back through a Redis list per run (`BLPOP`), not by polling each job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any, cast

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from ralph.background.models import TaskDefinition
from ralph.background.store import RunStore
from ralph.clock import Clock
from ralph.config import Settings

log = structlog.get_logger(__name__)

FUNCTION = "ralph_run_user"
DONE_TTL_SECONDS = 24 * 3600


def done_key(queue_name: str, run_id: str) -> str:
    return f"{queue_name}:done:{run_id}"


async def connect(settings: Settings) -> ArqRedis:
    return await create_pool(
        RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name
    )


class ArqDispatcher:
    """An `Executor` dispatch that enqueues each unit and waits for a worker to finish it."""

    def __init__(self, redis: ArqRedis, runs: RunStore, clock: Clock, queue_name: str) -> None:
        self._redis = redis
        self._runs = runs
        self._clock = clock
        self._queue = queue_name
        self._waiting: dict[str, dict[str, asyncio.Future[None]]] = {}
        self._listeners: dict[str, asyncio.Task[None]] = {}

    async def __call__(self, run_id: str, task: TaskDefinition, user_id: str) -> None:
        done = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(run_id, {})
        waiting[user_id] = done
        if run_id not in self._listeners:
            self._listeners[run_id] = asyncio.create_task(self._listen(run_id))
        try:
            await self._redis.enqueue_job(
                FUNCTION, run_id, user_id, _job_id=f"{run_id}:{user_id}", _queue_name=self._queue
            )
            # the agent's own timeout, plus time to be picked up and recorded
            await asyncio.wait_for(done, timeout=task.timeout_seconds + 300)
        except TimeoutError:
            await self._runs.fail_unfinished_user(
                run_id, task.name, user_id, self._clock.now(), "no worker finished this user"
            )
        finally:
            waiting.pop(user_id, None)
            if not waiting:
                self._waiting.pop(run_id, None)
                listener = self._listeners.pop(run_id, None)
                if listener is not None:
                    listener.cancel()

    async def _listen(self, run_id: str) -> None:
        key = done_key(self._queue, run_id)
        # redis-py types its commands for both sync and async clients; this one is async
        blpop = cast(
            "Callable[..., Awaitable[tuple[bytes, bytes] | None]]",
            self._redis.blpop,  # pyright: ignore[reportUnknownMemberType]
        )
        while True:
            item = await blpop([key], timeout=1)
            if item is None:
                continue
            user_id = item[1].decode()
            done = self._waiting.get(run_id, {}).get(user_id)
            if done is not None and not done.done():
                done.set_result(None)

    async def aclose(self) -> None:
        for listener in self._listeners.values():
            listener.cancel()
        await self._redis.aclose()


async def run_user_job(ctx: dict[str, Any], run_id: str, user_id: str) -> str:
    """The worker's job: execute one unit, then tell the server it is done."""
    from ralph.services import Services

    services: Services = ctx["services"]
    snapshots: dict[str, TaskDefinition] = ctx["snapshots"]
    task = snapshots.get(run_id)
    if task is None:
        task = snapshots[run_id] = await services.runs.snapshot(run_id)
        if len(snapshots) > 1000:
            snapshots.pop(next(iter(snapshots)))
    await services.executor.run_user(run_id, task, user_id)
    redis: ArqRedis = ctx["redis"]
    key = done_key(services.settings.queue_name, run_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.rpush(key, user_id)  # pyright: ignore[reportUnusedCallResult]
        pipe.expire(key, DONE_TTL_SECONDS)  # pyright: ignore[reportUnusedCallResult]
        await pipe.execute()
    return (await services.runs.user(run_id, user_id)).status.value


def build_worker(
    settings: Settings, *, clock: Clock | None = None, handle_signals: bool = True
) -> Worker:
    """An ARQ worker executing Ralph's units with `settings` (same database as the server)."""
    from ralph.services import open_services

    stack = AsyncExitStack()

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["services"] = await stack.enter_async_context(
            open_services(settings, clock=clock, apply_migrations=False, role="worker")
        )
        ctx["snapshots"] = {}
        log.info("worker_started", queue=settings.queue_name, max_jobs=settings.worker_max_jobs)

    async def shutdown(ctx: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await stack.aclose()

    return Worker(
        functions=[func(run_user_job, name=FUNCTION, max_tries=1)],
        queue_name=settings.queue_name,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=settings.worker_max_jobs,
        job_timeout=timedelta(days=1),
        keep_result=60,
        poll_delay=0.05,
        handle_signals=handle_signals,
        log_results=False,
    )
