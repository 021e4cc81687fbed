"""Shared fixtures: every store test runs on SQLite and on MariaDB."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from httpx import AsyncClient
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.composition import Services, open_services
from ralph.config import Settings
from ralph.db import migrate
from ralph.db.engine import create_engine
from ralph.db.tables import metadata
from ralph.logs import configure_logging
from ralph.testing.clock import FakeClock
from ralph.testing.databases import MARIADB, POSTGRES, DatabaseServer
from ralph.testing.model_server import ModelServer, scripted
from ralph.testing.model_server import text as text_reply
from tests.helpers import AppHarness, create_database, harness_for, in_own_loop

os.environ["AGNO_TELEMETRY"] = "false"
# Logs go to stderr, as in the server: commands under test own stdout.
configure_logging("info", json=False)


def _schema_url(server: DatabaseServer) -> Iterator[str]:
    """One migrated database on `server` for the whole test session, dropped at the end."""

    async def create() -> str:
        url = await create_database(server)
        engine = create_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
        return url

    url = in_own_loop(create)
    yield url
    in_own_loop(lambda: server.drop_database(url))


@pytest.fixture(scope="session")
def mariadb_schema_url() -> Iterator[str]:
    yield from _schema_url(MARIADB)


@pytest.fixture(scope="session")
def postgres_schema_url() -> Iterator[str]:
    yield from _schema_url(POSTGRES)


async def _truncate_all(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            await connection.execute(table.delete())


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated, empty database: a fresh SQLite file, or the session's MariaDB or
    PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ralph.db'}"
        engine = create_engine(url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
        yield url
        return
    url = request.getfixturevalue(f"{request.param}_schema_url")
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
        # agents in the test's own event loop, on its injected clock
        worker_mode="inprocess",
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    """A scripted model server answering "done" until a test sets its responder."""
    with ModelServer(scripted(text_reply("done"))) as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def harness(settings: Settings, clock: FakeClock) -> AsyncIterator[AppHarness]:
    async with harness_for(settings, clock) as harness:
        yield harness


@pytest.fixture
def client(harness: AppHarness) -> AsyncClient:
    return harness.client


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RALPH_* variables from the developer's shell leak into settings tests."""
    for key in list(os.environ):
        if key.startswith("RALPH_"):
            monkeypatch.delenv(key)


@pytest.fixture
async def second_replica(harness: AppHarness, clock: FakeClock) -> AsyncIterator[Services]:
    """Another server's services with their own engine (own connections) on the same database,
    as a second server process would have."""
    services = harness.services
    engine = create_engine(services.settings.effective_database_url)
    async with open_services(
        services.settings, clock=clock, models=services.models, engine=engine
    ) as other:
        yield other
        await other.coordinator.drain()
    await engine.dispose()


# Modules whose tests take a database but are about something else (agents, models, workers,
# the CLI, webhooks, fuzzing): on SQLite and MariaDB only, unless RALPH_TEST_ALL_DATABASES=1.
# The store, API, scheduler, recovery and outage tests run on PostgreSQL too.
NOT_ON_POSTGRES = frozenset(
    {
        "test_agent_loop.py",
        "test_agent_process.py",
        "test_agents.py",
        "test_api_fuzz.py",
        "test_budgets.py",
        "test_chat.py",
        "test_cli.py",
        "test_extract.py",
        "test_honcho.py",
        "test_metrics.py",
        "test_model_faults.py",
        "test_model_habits.py",
        "test_settings.py",
        "test_webhooks.py",
        "test_worker.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RALPH_TEST_ALL_DATABASES") == "1":
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        on_postgres = "[postgres" in item.nodeid or "-postgres" in item.nodeid
        (dropped if on_postgres and item.path.name in NOT_ON_POSTGRES else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
