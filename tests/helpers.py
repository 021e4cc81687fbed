"""Helpers for tests (the fixtures are in conftest.py): databases on the MariaDB server, apps
served in-process or on a port, settings pointed at a scripted model server, runs to the end."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from arq.worker import Worker
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient

from ralph.app import create_app
from ralph.background.models import TaskDefinition, TaskRun, TriggerType
from ralph.clock import Clock
from ralph.composition import Services
from ralph.config import Settings
from ralph.testing.databases import MARIADB, POSTGRES, SERVERS, DatabaseServer, Unreachable
from ralph.testing.model_server import ModelServer

T = TypeVar("T")

# the servers whose absence fails a test instead of skipping it
REQUIRED = {
    MARIADB: os.environ.get("RALPH_REQUIRE_MARIADB") == "1" or os.environ.get("CI") == "true",
    POSTGRES: os.environ.get("RALPH_REQUIRE_POSTGRES") == "1",
}


def unreachable(server: DatabaseServer) -> None:
    """Skip the test, or fail it when the server is required (`RALPH_REQUIRE_*`)."""
    message = f"{server.name} not reachable at {server.url}"
    if REQUIRED[server]:
        pytest.fail(message)
    pytest.skip(message)


async def create_database(server: DatabaseServer) -> str:
    """A new database on `server` (the test skips, or fails when required, if it does not
    answer)."""
    try:
        return await server.create_database()
    except Unreachable:
        unreachable(server)
        raise


async def create_mariadb_database() -> str:
    return await create_database(MARIADB)


async def drop_mariadb_database(url: str) -> None:
    await MARIADB.drop_database(url)


async def create_postgres_database() -> str:
    return await create_database(POSTGRES)


async def drop_postgres_database(url: str) -> None:
    await POSTGRES.drop_database(url)


def in_own_loop(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in another thread.

    Session-wide set-up runs outside any test's event loop this way.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def empty_database(name: str, tmp_path: Path) -> Iterator[str]:
    """For a fixture: an empty database (`name`: sqlite, mariadb or postgres) that server
    processes migrate themselves, dropped after."""
    if name == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ralph.db'}"
        return
    server = SERVERS[name]
    url = in_own_loop(lambda: create_database(server))
    yield url
    in_own_loop(lambda: server.drop_database(url))


def using_model_server(settings: Settings, server: ModelServer, **extra: object) -> Settings:
    """`settings` with the `openai` provider pointed at the scripted server, no retries."""
    update: dict[str, object] = {
        "model_provider": "openai",
        "model_base_url": server.base_url,
        "model_id": "scripted",
        "model_max_retries": 0,
        **extra,
    }
    return settings.model_copy(update=update)


@asynccontextmanager
async def serving(settings: Settings, clock: Clock | None = None) -> AsyncGenerator[AsyncClient]:
    """An app for `settings` with its lifespan running, and a client speaking to it in-process."""
    async with harness_for(settings, clock) as harness:
        yield harness.client


class AppHarness:
    """An app with its lifespan running, an HTTP client speaking to it in-process and, where a
    test needs them, the scripted model server and the ARQ worker it uses."""

    def __init__(
        self,
        app: FastAPI,
        client: AsyncClient,
        *,
        server: ModelServer | None = None,
        worker: Worker | None = None,
    ) -> None:
        self.app = app
        self.client = client
        self._server = server
        self._worker = worker

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    @property
    def server(self) -> ModelServer:
        assert self._server is not None, "this harness has no model server"
        return self._server

    @property
    def worker(self) -> Worker:
        assert self._worker is not None, "this harness has no worker"
        return self._worker


@asynccontextmanager
async def harness_for(
    settings: Settings,
    clock: Clock | None = None,
    *,
    server: ModelServer | None = None,
    worker: Worker | None = None,
) -> AsyncGenerator[AppHarness]:
    """`AppHarness` for an app built from `settings`, its lifespan running."""
    app = create_app(settings, clock=clock)
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://ralph.test") as client,
    ):
        yield AppHarness(app, client, server=server, worker=worker)


class LiveServer:
    """The app served by uvicorn on a free loopback port, from a background thread."""

    def __init__(self, settings: Settings) -> None:
        import threading

        import uvicorn

        from ralph.testing.processes import free_port

        self.port = free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import time

        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


async def execute_task(
    services: Services,
    task: TaskDefinition,
    trigger: TriggerType = TriggerType.MANUAL,
    user_ids: Sequence[str] | None = None,
) -> TaskRun:
    """Create a run of `task` and execute it to the end in this event loop."""
    run_id = await services.background.create_run(task, trigger, user_ids)
    return await services.coordinator.execute(run_id)


def notes_task(**overrides: Any) -> dict[str, Any]:
    """A nightly task whose agents may edit memory (the body for `POST /background/tasks`)."""
    body: dict[str, Any] = {
        "name": "nightly",
        "system_prompt": "keep notes",
        "tools": ["edit_memory_block"],
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": ["u1"],
    }
    return body | overrides


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll `condition` (real time: for tests of real processes) until it is truthy; its
    value, or AssertionError after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
