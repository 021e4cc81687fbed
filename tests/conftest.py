"""Shared fixtures: every store test runs on SQLite and on MariaDB."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.app import create_app
from ralph.background.executor import Executor
from ralph.clock import Clock
from ralph.config import Settings
from ralph.db import migrate
from ralph.db.engine import create_engine
from ralph.db.tables import metadata
from ralph.logs import configure_logging
from ralph.services import Services
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import ModelServer, scripted
from ralph.testing.model_server import text as text_reply

os.environ["AGNO_TELEMETRY"] = "false"
# Logs go to stderr, as in the server: commands under test own stdout.
configure_logging("info", json=False)
T = TypeVar("T")

MARIADB_SERVER = os.environ.get("RALPH_TEST_MARIADB_URL", "mysql+asyncmy://root@127.0.0.1:3306")
REQUIRE_MARIADB = os.environ.get("RALPH_REQUIRE_MARIADB") == "1" or os.environ.get("CI") == "true"


async def _server_reachable(url: str) -> bool:
    engine = create_engine(url + "/")
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        await engine.dispose()


async def create_mariadb_database() -> str:
    """Create a uniquely named database on the MariaDB server; return its URL."""
    if not await _server_reachable(MARIADB_SERVER):
        message = f"MariaDB not reachable at {MARIADB_SERVER}"
        if REQUIRE_MARIADB:
            pytest.fail(message)
        pytest.skip(message)
    name = f"ralph_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(MARIADB_SERVER + "/")
    try:
        async with engine.begin() as connection:
            await connection.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    finally:
        await engine.dispose()
    return f"{MARIADB_SERVER}/{name}?charset=utf8mb4"


async def drop_mariadb_database(url: str) -> None:
    name = url.rsplit("/", 1)[1].split("?")[0]
    engine = create_engine(MARIADB_SERVER + "/")
    try:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    finally:
        await engine.dispose()


def in_own_loop(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in another thread.

    Session-wide set-up runs outside any test's event loop this way.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


@pytest.fixture(scope="session")
def mariadb_schema_url() -> Iterator[str]:
    """One migrated MariaDB database for the whole test session, dropped at the end."""
    if not in_own_loop(lambda: _server_reachable(MARIADB_SERVER)):
        message = f"MariaDB not reachable at {MARIADB_SERVER}"
        if REQUIRE_MARIADB:
            pytest.fail(message)
        pytest.skip(message)

    async def create() -> str:
        url = await create_mariadb_database()
        engine = create_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
        return url

    url = in_own_loop(create)
    yield url
    in_own_loop(lambda: drop_mariadb_database(url))


async def _truncate_all(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            await connection.execute(table.delete())


@pytest.fixture(params=["sqlite", "mariadb"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated, empty database: a fresh SQLite file, or the session's MariaDB database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ralph.db'}"
        engine = create_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
        yield url
        return
    url = request.getfixturevalue("mariadb_schema_url")
    engine = create_engine(url)
    try:
        await _truncate_all(engine)
    finally:
        await engine.dispose()
    yield url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        scheduler_enabled=False,
        model_provider="dev",
        _env_file=None,  # type: ignore[call-arg]
    )


async def drain(executor: Executor) -> None:
    """Wait until the executor has no run in progress."""
    while executor.active_runs:
        await asyncio.gather(
            *[executor._active[r] for r in executor.active_runs],  # pyright: ignore[reportPrivateUsage]
        )


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


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    """A scripted model server answering "done" until a test sets its responder."""
    with ModelServer(scripted(text_reply("done"))) as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serving(settings: Settings, clock: Clock | None = None) -> AsyncGenerator[AsyncClient]:
    """An app for `settings` with its lifespan running, and a client speaking to it in-process."""
    app = create_app(settings, clock=clock)
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://ralph.test") as client,
    ):
        yield client


class AppHarness:
    """An app with its lifespan running, and an HTTP client speaking to it in-process."""

    def __init__(self, app: FastAPI, client: AsyncClient) -> None:
        self.app = app
        self.client = client

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services


@pytest.fixture
async def harness(settings: Settings, clock: FakeClock) -> AsyncIterator[AppHarness]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app)
        async with AsyncClient(transport=transport, base_url="http://ralph.test") as client:
            yield AppHarness(app, client)


@pytest.fixture
def client(harness: AppHarness) -> AsyncClient:
    return harness.client


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RALPH_* variables from the developer's shell leak into settings tests."""
    for key in list(os.environ):
        if key.startswith("RALPH_"):
            monkeypatch.delenv(key)


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
