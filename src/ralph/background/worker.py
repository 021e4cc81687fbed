"""ARQ worker mode, the workers' side: `ralph worker` executes the units servers enqueue
(`ralph.background.queue` is the servers' side).

Each unit is `UnitRunner.run_user`; while it runs, the worker keeps a liveness key in Redis
fresh (a running user without one belongs to a dead worker) and polls the run's cancel flag
(a cancel is requested through a server, which cannot reach this process's agents)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func

from ralph.background.queue import DONE_TTL_SECONDS, FUNCTION, alive_key, done_key
from ralph.clock import Clock
from ralph.composition import Services, open_services
from ralph.config import Settings

log = structlog.get_logger(__name__)


async def _keep_alive(redis: ArqRedis, key: str, heartbeat_seconds: float) -> None:
    while True:
        await asyncio.sleep(heartbeat_seconds)
        await redis.set(key, b"1", px=_alive_ttl_ms(heartbeat_seconds))


def _alive_ttl_ms(heartbeat_seconds: float) -> int:
    return max(1, round(3 * heartbeat_seconds * 1000))


async def _watch_cancel(services: Services, run_id: str) -> None:
    """Stop the run's agents here once a cancel is requested (through any server)."""
    while True:
        await asyncio.sleep(services.settings.worker_cancel_poll_seconds)
        if await services.runs.get_cancel_flag(run_id):
            services.units.inflight.cancel(run_id)
            return


async def run_user_job(ctx: dict[str, Any], run_id: str, user_id: str) -> str:
    """The worker's job: execute one unit, then tell the server it is done (also when it
    failed here: the user is then recorded as failed, so the server does not wait for it)."""
    services: Services = ctx["services"]
    redis: ArqRedis = ctx["redis"]
    queue = services.settings.queue_name
    heartbeat = services.settings.worker_heartbeat_seconds
    alive = alive_key(queue, run_id, user_id)
    try:
        # set before the user is marked running: the server reads a running user without
        # this key as a dead worker
        await redis.set(alive, b"1", px=_alive_ttl_ms(heartbeat))
        helpers = [
            asyncio.create_task(_keep_alive(redis, alive, heartbeat)),
            asyncio.create_task(_watch_cancel(services, run_id)),
        ]
        try:
            await services.units.run_delivered(run_id, user_id, where="worker")
        finally:
            for helper in helpers:
                helper.cancel()
    finally:
        key = done_key(queue, run_id)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, user_id)  # pyright: ignore[reportUnusedCallResult]
            pipe.expire(key, DONE_TTL_SECONDS)  # pyright: ignore[reportUnusedCallResult]
            pipe.delete(alive)  # pyright: ignore[reportUnusedCallResult]
            await pipe.execute()
    return (await services.runs.user(run_id, user_id)).status.value


def build_worker(
    settings: Settings, *, clock: Clock | None = None, handle_signals: bool = True
) -> Worker:
    """An ARQ worker executing Ralph's units with `settings` (same database as the server)."""
    stack = AsyncExitStack()

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["services"] = await stack.enter_async_context(
            open_services(settings, clock=clock, apply_migrations=False, role="worker")
        )
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
