"""ARQ worker mode over the real Redis: the server enqueues units, a worker executes them."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import redis.asyncio as redis_asyncio
from arq.worker import Worker
from httpx import ASGITransport, AsyncClient

from ralph.app import create_app
from ralph.background.queue import build_worker
from ralph.config import Settings
from ralph.services import Services
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import Delay, ModelServer, call, scripted, text
from tests.conftest import using_model_server

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


class WorkerHarness:
    def __init__(
        self, client: AsyncClient, services: Services, worker: Worker, server: ModelServer
    ) -> None:
        self.client = client
        self.services = services
        self.worker = worker
        self.server = server


@pytest.fixture
async def arq(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> AsyncIterator[WorkerHarness]:
    if not await _redis_reachable():
        if REQUIRE_REDIS:
            pytest.fail(f"Redis not reachable at {REDIS_URL}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    settings = using_model_server(
        settings,
        model_server,
        worker_mode="arq",
        redis_url=REDIS_URL,
        queue_name=f"ralph-test-{uuid.uuid4().hex[:10]}",
        worker_cancel_poll_seconds=0.1,
        wait_max_seconds=30.0,
    )
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        worker = build_worker(settings, clock=clock, handle_signals=False)
        running = asyncio.create_task(worker.async_run())
        try:
            async with AsyncClient(
                transport=ASGITransport(app=app), base_url="http://ralph.test"
            ) as client:
                yield WorkerHarness(client, app.state.services, worker, model_server)
        finally:
            running.cancel()
            await worker.close()
            cleanup = _redis()
            scan = cast(
                "Callable[[str], AsyncIterator[bytes]]",
                cleanup.scan_iter,  # pyright: ignore[reportUnknownMemberType]
            )
            keys = [k async for k in scan(f"{settings.queue_name}*")]
            if keys:
                await cleanup.delete(*keys)
            await cleanup.aclose()


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


async def test_units_run_in_the_worker(arq: WorkerHarness) -> None:
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
    async with asyncio.timeout(5):
        while arq.worker.jobs_complete < 7:  # noqa: ASYNC110 - a counter, no event to wait on
            await asyncio.sleep(0.01)
    assert arq.worker.jobs_complete == 7
    assert arq.server.max_in_flight <= 3  # the server's window still caps concurrency
    for user in users:
        proposals = await arq.services.memory.list_proposals(user)
        assert [(p.user_id, p.run_id) for p in proposals] == [(user, body["id"])]


async def test_cancel_reaches_agents_in_the_worker(arq: WorkerHarness) -> None:
    arq.server.responder = scripted(Delay(30.0, text("never")))
    await arq.client.post("/background/tasks", json=task_body(["a", "b", "c", "d"], tools=[]))
    run_id = (await arq.client.post("/background/tasks/queued/run")).json()["run_id"]
    await arq.server.wait_for_in_flight(3)
    await arq.client.post(f"/background/runs/{run_id}/cancel")
    job = arq.services.executor._active[run_id]  # pyright: ignore[reportPrivateUsage]
    run = await asyncio.wait_for(job, 10)
    assert run.counts == {"cancelled": 4}
    assert run.status.value == "cancelled"
