"""ARQ worker mode over the real Redis: the server enqueues units, a worker executes them."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as redis_asyncio
from arq.worker import Worker
from prometheus_client.parser import text_string_to_metric_families

from ralph.app import create_app
from ralph.background.models import (
    RunStatus,
    TaskDefinition,
    TaskRun,
    TriggerType,
    UserStatus,
)
from ralph.background.queue import alive_key
from ralph.background.worker import build_worker
from ralph.composition import Services
from ralph.config import Settings
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import Delay, ModelServer, call, in_order, scripted, text
from ralph.testing.processes import free_port, start_worker_process
from tests.helpers import AppHarness, execute_task, harness_for, using_model_server

REDIS_URL = os.environ.get("RALPH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("RALPH_REQUIRE_REDIS") == "1" or os.environ.get("CI") == "true"


def _redis() -> redis_asyncio.Redis:
    return redis_asyncio.Redis.from_url(REDIS_URL)  # pyright: ignore[reportUnknownMemberType]


async def _redis_reachable() -> bool:
    client = _redis()
    try:
        return bool(await client.ping())  # pyright: ignore[reportUnknownMemberType]
    except Exception:
        return False
    finally:
        await client.aclose()


async def require_redis() -> None:
    if not await _redis_reachable():
        if REQUIRE_REDIS:
            pytest.fail(f"Redis not reachable at {REDIS_URL}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}")


def arq_settings(settings: Settings, server: ModelServer, **extra: object) -> Settings:
    """`settings` in ARQ mode on a queue of their own, the model served by `server`."""
    return using_model_server(
        settings,
        server,
        worker_mode="arq",
        redis_url=REDIS_URL,
        queue_name=f"ralph-test-{uuid.uuid4().hex[:10]}",
        worker_cancel_poll_seconds=0.1,
        wait_max_seconds=30.0,
        **extra,
    )


@asynccontextmanager
async def running_worker(settings: Settings, clock: FakeClock) -> AsyncGenerator[Worker]:
    """A worker on `settings.queue_name`; its Redis keys are deleted afterwards."""
    worker = build_worker(settings, clock=clock, handle_signals=False)
    running = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        running.cancel()
        await worker.close()
        await delete_queue_keys(settings.queue_name)


async def delete_queue_keys(queue_name: str) -> None:
    cleanup = _redis()
    scan = cast(
        "Callable[[str], AsyncIterator[bytes]]",
        cleanup.scan_iter,  # pyright: ignore[reportUnknownMemberType]
    )
    keys = [k async for k in scan(f"{queue_name}*")]
    if keys:
        await cleanup.delete(*keys)
    await cleanup.aclose()


async def _jobs_complete(worker: Worker, count: int) -> None:
    async with asyncio.timeout(10):
        while worker.jobs_complete < count:  # noqa: ASYNC110 - a counter, no event to wait on
            await asyncio.sleep(0.01)


async def _recovered_rerun(services: Services, clock: FakeClock) -> list[str]:
    """Past the run lease, one recovery tick starts one rerun, which succeeds: its users."""
    await clock.advance(services.settings.run_lease_seconds + 1)
    [rerun_id] = (await services.scheduler.tick()).recovered
    await services.coordinator.drain()
    rerun = await services.runs.get(rerun_id)
    assert rerun.status is RunStatus.SUCCESS
    return [u.user_id for u in await services.runs.users(rerun_id)]


async def _lost_and_freed(
    services: Services, task: TaskDefinition, job: asyncio.Task[TaskRun], clock: FakeClock
) -> None:
    """The run of user "a" ends failed with "worker lost", and its lock is released."""
    run = await asyncio.wait_for(job, 10)
    assert run.status is RunStatus.FAILED
    user = await services.runs.user(run.id, "a")
    assert user.error is not None
    assert user.error.startswith("worker lost")
    other = await services.background.create_run(task, TriggerType.MANUAL)
    assert (await services.runs.start_user(other, task.name, "a", clock.now())).started


@pytest.fixture
async def arq(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> AsyncIterator[AppHarness]:
    await require_redis()
    settings = arq_settings(settings, model_server)
    async with (
        running_worker(settings, clock) as worker,
        harness_for(settings, clock, server=model_server, worker=worker) as harness,
    ):
        yield harness


# one attempt: a lost worker ends the user at once (retries: test_retries)
ONE_ATTEMPT = {"max_attempts": 1}


def task_body(users: list[str], **overrides: Any) -> dict[str, Any]:
    return {
        "name": "queued",
        "system_prompt": "review",
        "tools": ["list_memory_blocks", "edit_memory_block"],
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": users,
        "batch_size": 3,
        **overrides,
    }


async def test_units_run_in_the_worker(arq: AppHarness) -> None:
    users = [f"u{i}" for i in range(7)]
    arq.server.responder = scripted(
        Delay(0.05, call("edit_memory_block", label="notes", body="seen", reason="r")),
        text("done"),
    )
    await arq.client.post("/background/tasks", json=task_body(users))
    response = await arq.client.post("/background/tasks/queued/run?wait=true")
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "success"
    assert body["counts"] == {"success": 7}
    assert all(u["proposals_created"] == 1 for u in body["user_results"])
    # every unit went through the queue (a job counts as complete just after it reports done)
    await _jobs_complete(arq.worker, 7)
    assert arq.worker.jobs_complete == 7
    assert arq.server.max_in_flight <= 3  # the server's window still caps concurrency
    for user in users:
        proposals = await arq.services.memory.list_proposals(user)
        assert [(p.user_id, p.run_id) for p in proposals] == [(user, body["id"])]


async def test_extract_mode_runs_in_the_worker(arq: AppHarness) -> None:
    """The extract mode's one structured call, made by a worker: its edits are proposed."""
    users = ["u1", "u2"]
    for user in users:
        await arq.client.put(f"/users/{user}/blocks/notes", json={"body": "likes chess"})
        said = {"role": "user", "content": "my exam is on 12 May"}
        await arq.client.post(f"/users/{user}/messages", json=said)
    edit = {"label": "notes", "action": "append", "old_text": "", "text": "exam on 12 May"}
    reply = json.dumps({"new_facts": True, "edits": [{**edit, "reason": "said so"}]})
    arq.server.responder = scripted(text(reply))
    body = task_body(users, mode="extract", tools=[], memory_blocks=["notes"], episode_messages=5)
    assert (await arq.client.post("/background/tasks", json=body)).status_code == 201
    run = (await arq.client.post("/background/tasks/queued/run?wait=true")).json()
    assert run["counts"] == {"success": 2}, run
    await _jobs_complete(arq.worker, 2)
    for user in users:
        (proposal,) = await arq.services.memory.list_proposals(user)
        assert (proposal.label, proposal.run_id) == ("notes", run["id"])
        assert "exam on 12 May" in proposal.diff


async def test_cancel_reaches_agents_in_the_worker(arq: AppHarness) -> None:
    arq.server.responder = scripted(Delay(30.0, text("never")))
    await arq.client.post("/background/tasks", json=task_body(["a", "b", "c", "d"], tools=[]))
    run_id = (await arq.client.post("/background/tasks/queued/run")).json()["run_id"]
    await arq.server.wait_for_in_flight(3)
    await arq.client.post(f"/background/runs/{run_id}/cancel")
    run = await arq.services.coordinator.wait(run_id, 10)
    assert run is not None
    assert run.counts == {"cancelled": 4}
    assert run.status.value == "cancelled"


async def test_server_shutdown_leaves_started_units_to_the_worker(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    """The server stops mid-run: units a worker started finish there; queued ones do nothing
    and their users (the two the worker had not taken) are re-run once, after a restart.
    Every user's agent runs once."""
    await require_redis()
    settings = arq_settings(settings, model_server, shutdown_grace_seconds=0.2, worker_max_jobs=2)
    gate = asyncio.Event()  # bound to the model server's loop when first awaited there
    answered = 0

    async def respond(request: dict[str, Any]) -> Any:
        nonlocal answered
        answered += 1
        if answered <= 2:
            await gate.wait()
        return text("done")

    model_server.responder = respond
    app = create_app(settings, clock=clock)
    async with running_worker(settings, clock) as worker:
        async with app.router.lifespan_context(app):
            services: Services = app.state.services
            task = TaskDefinition.model_validate(
                task_body(["a", "b", "c", "d"], tools=[], batch_size=4)
            )
            await services.registry.create(task)
            run_id = await services.background.create_run(task, TriggerType.MANUAL)
            services.coordinator.start(run_id)
            await model_server.wait_for_in_flight(2)  # a and b in the worker, c and d queued
        assert model_server.loop is not None
        model_server.loop.call_soon_threadsafe(gate.set)
        async with app.router.lifespan_context(app):
            services = app.state.services
            await _jobs_complete(worker, 4)
            run = await services.runs.get(run_id)
            assert run.status is RunStatus.INTERRUPTED
            assert run.counts == {"success": 2, "interrupted": 2}
            users = await services.runs.users(run_id)
            # which two the worker took first is the queue's order, not the test's
            interrupted = sorted(u.user_id for u in users if u.status.value == "interrupted")
            assert sorted(await _recovered_rerun(services, clock)) == interrupted
    assert model_server.calls == 4


async def test_a_unit_whose_worker_died_is_failed(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    """A user left `running` by a worker that no longer refreshes the unit's liveness key is
    failed within a few heartbeats, not after the agent's timeout."""
    await require_redis()
    settings = arq_settings(settings, model_server, worker_heartbeat_seconds=0.1)
    app = create_app(settings, clock=clock)
    try:
        async with app.router.lifespan_context(app):
            services: Services = app.state.services
            task = TaskDefinition.model_validate(task_body(["a"], tools=[], retry=ONE_ATTEMPT))
            await services.registry.create(task)
            run_id = await services.background.create_run(task, TriggerType.MANUAL)
            job = services.coordinator.start(run_id)
            redis = _redis()
            async with asyncio.timeout(10):
                # the unit is queued (a Redis sorted set; nothing to wait on but polling)
                while not await redis.zcard(settings.queue_name):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await redis.aclose()
            # what a worker does when it takes the unit, and then it dies (no worker runs here)
            assert (await services.runs.start_user(run_id, task.name, "a", clock.now())).started
            await _lost_and_freed(services, task, job, clock)
    finally:
        await delete_queue_keys(settings.queue_name)
    assert model_server.calls == 0


async def test_a_live_worker_keeps_a_long_unit_alive(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    await require_redis()
    settings = arq_settings(settings, model_server, worker_heartbeat_seconds=0.1)
    model_server.responder = scripted(Delay(1.0, text("slow but alive")))
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), running_worker(settings, clock):
        services: Services = app.state.services
        task = TaskDefinition.model_validate(task_body(["a", "b"], tools=[]))
        await services.registry.create(task)
        run = await execute_task(services, task)
    assert run.counts == {"success": 2}  # 1 s each: ten heartbeats, more than three TTLs


async def test_recovery_leaves_a_unit_to_its_live_worker(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    """A server crashed mid-run: recovery re-runs the users nobody runs any more, and leaves
    the one a live worker still runs to it, lock included."""
    await require_redis()
    settings = arq_settings(settings, model_server)
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app), running_worker(settings, clock):
        services: Services = app.state.services
        task = TaskDefinition.model_validate(task_body(["a", "b", "c"], tools=[]))
        await services.registry.create(task)
        run_id = await services.background.create_run(task, TriggerType.MANUAL)
        # the crashed server had dispatched "a" (its worker lives on) and "b" (its worker
        # died too); "c" was still pending
        assert await services.runs.mark_started(run_id, "crashed-server", clock.now())
        redis = _redis()
        await redis.set(alive_key(settings.queue_name, run_id, "a"), b"1", px=60_000)
        await redis.aclose()
        for user in ("a", "b"):
            assert (await services.runs.start_user(run_id, task.name, user, clock.now())).started

        assert await _recovered_rerun(services, clock) == ["b", "c"]
        crashed = await services.runs.get(run_id)
        assert crashed.status is RunStatus.INTERRUPTED
        assert crashed.counts == {"running": 1, "interrupted": 2}
        other = await services.background.create_run(task, TriggerType.MANUAL)
        start = await services.runs.start_user(other, task.name, "a", clock.now())
        assert start.held_by == run_id  # until a's worker records its result

        # then a's worker dies too: the next recovery fails "a" and frees it
        redis = _redis()
        await redis.delete(alive_key(settings.queue_name, run_id, "a"))
        await redis.aclose()
        await services.scheduler.tick()
        lost = await services.runs.user(run_id, "a")
        assert lost.status is UserStatus.FAILED
        assert lost.error == "worker lost after the server stopped"
        third = await services.background.create_run(task, TriggerType.MANUAL)
        assert (await services.runs.start_user(third, task.name, "a", clock.now())).started
    assert model_server.calls == 2


async def test_a_worker_process_serves_its_agents_metrics(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    """`ralph worker` with RALPH_WORKER_METRICS_PORT: the agents it ran are counted there."""
    await require_redis()
    port = free_port()
    settings = arq_settings(settings, model_server, worker_metrics_port=port)
    model_server.responder = scripted(text("done"))
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):  # migrates the database before the worker
        worker = await start_worker_process(settings)
        try:
            services: Services = app.state.services
            task = TaskDefinition.model_validate(task_body(["a", "b"], tools=[]))
            await services.registry.create(task)
            run = await execute_task(services, task)
            assert run.counts == {"success": 2}
            async with httpx.AsyncClient() as client:
                exposition = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        finally:
            worker.terminate()
            await worker.wait()
            await delete_queue_keys(settings.queue_name)
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    success = (("status", "success"), ("task", task.name))
    assert found[("ralph_agent_run_seconds_count", success)] == 2
    assert found[("ralph_model_calls_total", (("task", task.name),))] == 2


async def test_kill_9_of_a_worker_process_fails_its_unit(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    """A real `ralph worker` process is killed while its agent waits for the model: the
    server notices within a few heartbeats, fails the user and releases its lock."""
    await require_redis()
    settings = arq_settings(settings, model_server, worker_heartbeat_seconds=0.2)
    model_server.responder = scripted(Delay(60.0, text("never")))
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):  # migrates the database before the worker
        worker = await start_worker_process(settings)
        try:
            services: Services = app.state.services
            task = TaskDefinition.model_validate(task_body(["a"], tools=[], retry=ONE_ATTEMPT))
            await services.registry.create(task)
            run_id = await services.background.create_run(task, TriggerType.MANUAL)
            job = services.coordinator.start(run_id)
            await model_server.wait_for_in_flight(1, timeout_seconds=60)
            worker.kill()
            await worker.wait()
            await _lost_and_freed(services, task, job, clock)
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
            await delete_queue_keys(settings.queue_name)


async def test_units_a_stopping_worker_cancels_are_run_again(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    """A worker stopped mid-unit (a deploy) cancels its agent: the user is `interrupted`, and
    the server re-runs it at once in a new run, which another worker takes."""
    await require_redis()
    settings = arq_settings(settings, model_server, shutdown_grace_seconds=0)
    model_server.responder = in_order(Delay(30.0, text("late")), then=scripted(text("done")))
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        task = TaskDefinition.model_validate(task_body(["a"], tools=[], retry=ONE_ATTEMPT))
        await services.registry.create(task)
        first = build_worker(settings, clock=clock, handle_signals=False)
        running = asyncio.create_task(first.async_run())
        run_id = await services.background.create_run(task, TriggerType.MANUAL)
        job = services.coordinator.start(run_id)
        await model_server.wait_for_in_flight(1)
        await first.close()  # what SIGTERM does once the grace period is over
        running.cancel()
        run = await asyncio.wait_for(job, 10)
        assert run.status is RunStatus.INTERRUPTED
        assert run.counts == {"interrupted": 1}
        [rerun_id] = services.coordinator.active_runs
        async with running_worker(settings, clock):
            await services.coordinator.drain()
        rerun = await services.runs.get(rerun_id)
        assert rerun.status is RunStatus.SUCCESS
        assert [u.user_id for u in await services.runs.users(rerun_id)] == ["a"]
    assert model_server.calls == 2
