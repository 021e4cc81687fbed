"""ARQ worker mode: the (run, user) units of a run executed by worker processes over Redis.

The server keeps the sliding window (it decides what runs, and how many at once); instead of
running an agent itself it enqueues `ralph_run_user(run_id, user_id)` and waits for the worker
to report the unit done. Workers (`ralph worker`, any number, on any machine that reaches the
database, Redis and the model) execute `Executor.run_user`, which reads everything it needs
from the database and records the result there.

Completion comes back through a Redis list per run (`BLPOP`), not by polling each job. While
a worker runs a unit it keeps a liveness key with a short expiry fresh; a unit whose user is
`running` in the database but whose key has expired belongs to a worker that died, and the
server fails it instead of waiting out the agent's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from ralph.background.models import TaskDefinition, UserStatus
from ralph.background.store import RunStore
from ralph.clock import Clock
from ralph.config import Settings

if TYPE_CHECKING:
    from ralph.services import Services

log = structlog.get_logger(__name__)

FUNCTION = "ralph_run_user"
DONE_TTL_SECONDS = 24 * 3600


def done_key(queue_name: str, run_id: str) -> str:
    return f"{queue_name}:done:{run_id}"


def alive_key(queue_name: str, run_id: str, user_id: str) -> str:
    return f"{queue_name}:alive:{run_id}:{user_id}"


async def connect(settings: Settings) -> ArqRedis:
    return await create_pool(
        RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name
    )


class ArqDispatcher:
    """An `Executor` dispatch that enqueues each unit and waits for a worker to finish it."""

    def __init__(
        self,
        redis: ArqRedis,
        runs: RunStore,
        clock: Clock,
        queue_name: str,
        heartbeat_seconds: float = 10.0,
    ) -> None:
        self._redis = redis
        self._runs = runs
        self._clock = clock
        self._queue = queue_name
        self._heartbeat = heartbeat_seconds
        self._waiting: dict[str, dict[str, asyncio.Future[None]]] = {}
        self._task_names: dict[str, str] = {}
        self._listeners: dict[str, asyncio.Task[None]] = {}

    async def __call__(self, run_id: str, task: TaskDefinition, user_id: str) -> None:
        done = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(run_id, {})
        waiting[user_id] = done
        self._task_names[run_id] = task.name
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
                self._task_names.pop(run_id, None)
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
        loop = asyncio.get_running_loop()
        # liveness is judged on Redis's expiry, which runs on real time, not on `clock`
        next_check = loop.time() + self._heartbeat
        while True:
            try:
                item = await blpop([key], timeout=min(1.0, self._heartbeat))
                if item is not None:
                    self._resolve(run_id, item[1].decode())
                if loop.time() >= next_check:
                    next_check = loop.time() + self._heartbeat
                    await self._fail_lost_units(run_id)
            except Exception:
                # Redis or the database failed for a moment: keep listening, or every unit
                # of the run would wait out its timeout
                log.exception("unit_listener_error", run_id=run_id)
                await asyncio.sleep(1)

    def _resolve(self, run_id: str, user_id: str) -> None:
        done = self._waiting.get(run_id, {}).get(user_id)
        if done is not None and not done.done():
            done.set_result(None)

    async def _fail_lost_units(self, run_id: str) -> None:
        """Fail the users of `run_id` that are `running` without a live worker.

        A worker sets a unit's liveness key before it marks the user running and deletes it
        only after recording the result, so a running user without a key either just finished
        (failing it then changes nothing: only pending or running users are failed) or lost
        its worker."""
        waiting = self._waiting.get(run_id)
        if not waiting:
            return
        running = [u for u in await self._runs.user_ids(run_id, UserStatus.RUNNING) if u in waiting]
        alive = await self.alive_users(run_id, running)
        for user_id in running:
            if user_id in alive:
                continue
            log.warning("worker_lost", run_id=run_id, user_id=user_id)
            await self._runs.fail_unfinished_user(
                run_id,
                self._task_names[run_id],
                user_id,
                self._clock.now(),
                f"worker lost: no heartbeat for {3 * self._heartbeat:g} s",
            )
            self._resolve(run_id, user_id)

    async def alive_users(self, run_id: str, user_ids: Sequence[str]) -> set[str]:
        """Those of `user_ids` whose unit in `run_id` a live worker is running."""
        if not user_ids:
            return set()
        marks = await self._redis.mget([alive_key(self._queue, run_id, u) for u in user_ids])
        return {u for u, mark in zip(user_ids, marks, strict=True) if mark is not None}

    async def aclose(self) -> None:
        for listener in self._listeners.values():
            listener.cancel()
        await self._redis.aclose()


async def _keep_alive(redis: ArqRedis, key: str, heartbeat_seconds: float) -> None:
    while True:
        await asyncio.sleep(heartbeat_seconds)
        await redis.set(key, b"1", px=_alive_ttl_ms(heartbeat_seconds))


def _alive_ttl_ms(heartbeat_seconds: float) -> int:
    return max(1, round(3 * heartbeat_seconds * 1000))


async def run_user_job(ctx: dict[str, Any], run_id: str, user_id: str) -> str:
    """The worker's job: execute one unit, then tell the server it is done (also when it
    failed here: the user is then recorded as failed, so the server does not wait for it)."""
    services: Services = ctx["services"]
    redis: ArqRedis = ctx["redis"]
    queue = services.settings.queue_name
    heartbeat = services.settings.worker_heartbeat_seconds
    alive = alive_key(queue, run_id, user_id)
    task: TaskDefinition | None = None
    try:
        task = await _snapshot(ctx, services, run_id)
        # set before the user is marked running: the server reads a running user without
        # this key as a dead worker
        await redis.set(alive, b"1", px=_alive_ttl_ms(heartbeat))
        refresher = asyncio.create_task(_keep_alive(redis, alive, heartbeat))
        try:
            await services.executor.run_user(run_id, task, user_id)
        finally:
            refresher.cancel()
    except Exception as exc:
        log.exception("unit_error", run_id=run_id, user_id=user_id)
        if task is not None:
            await services.runs.fail_unfinished_user(
                run_id, task.name, user_id, services.clock.now(), f"worker error: {exc!r}"
            )
        raise
    finally:
        key = done_key(queue, run_id)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, user_id)  # pyright: ignore[reportUnusedCallResult]
            pipe.expire(key, DONE_TTL_SECONDS)  # pyright: ignore[reportUnusedCallResult]
            pipe.delete(alive)  # pyright: ignore[reportUnusedCallResult]
            await pipe.execute()
    return (await services.runs.user(run_id, user_id)).status.value


async def _snapshot(ctx: dict[str, Any], services: Services, run_id: str) -> TaskDefinition:
    """The run's task as it was when the run was created, cached per worker."""
    snapshots: dict[str, TaskDefinition] = ctx["snapshots"]
    task = snapshots.get(run_id)
    if task is None:
        task = snapshots[run_id] = await services.runs.snapshot(run_id)
        if len(snapshots) > 1000:
            snapshots.pop(next(iter(snapshots)))
    return task


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
        # on SIGTERM/SIGINT: take no new units, give running ones this long, then cancel them
        # (their users are `interrupted`, and the server re-runs them)
        job_completion_wait=math.ceil(settings.shutdown_grace_seconds),
        log_results=False,
    )
