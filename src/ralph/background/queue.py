"""ARQ worker mode, the server's side: the (run, user) units of a run handed to worker
processes over Redis (`ralph.background.worker` is the workers' side).

The server keeps the sliding window (it decides what runs, and how many at once); instead of
running an agent itself it enqueues `ralph_run_user(run_id, user_id)` and waits for the worker
to report the unit done. Workers (`ralph worker`, any number, on any machine that reaches the
database, Redis and the model) execute `UnitRunner.run_user`, which reads everything it needs
from the database and records the result there.

Completion comes back through a Redis list per run (`BLPOP`), not by polling each job. While
a worker runs a unit it keeps a liveness key with a short expiry fresh; a unit whose user is
`running` in the database but whose key has expired belongs to a worker that died, and the
server fails it instead of waiting out the agent's timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool

from ralph.background.models import TaskDefinition, UserStatus
from ralph.background.run_store import RunStore, UnitEnd
from ralph.clock import Clock
from ralph.config import Settings
from ralph.reasons import EndReason

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
    """A coordinator's dispatch that enqueues each unit and waits for a worker to finish it."""

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
            await self._runs.end_unit(
                run_id,
                task.name,
                user_id,
                UnitEnd(EndReason.WORKER_LOST, "no worker finished this user"),
                self._clock.now(),
                policy=task.retry,
                running_only=False,
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

    def cancel(self, run_id: str) -> None:
        """Nothing to send: workers poll the run's cancel flag, which is already set."""

    async def stop(self) -> None:
        """Stop waiting: the workers finish the units they have started; units still queued
        find their users `interrupted` and do nothing."""
        for waiting in self._waiting.values():
            for done in waiting.values():
                if not done.done():
                    done.set_result(None)

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
            lost = f"worker lost: no heartbeat for {3 * self._heartbeat:g} s"
            await self._runs.end_unit(
                run_id,
                self._task_names[run_id],
                user_id,
                UnitEnd(EndReason.WORKER_LOST, lost),
                self._clock.now(),
                running_only=False,
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
