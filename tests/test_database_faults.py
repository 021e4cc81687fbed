"""The database goes away mid-run and comes back: the run finishes or is recovered, every user
ends with exactly one success, none is left running, and /health says 503 while the database
is gone and 200 after. MariaDB through a proxy the test cuts; SQLite locked by another process.

Real time (the outage is real): every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
from httpx import AsyncClient
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from ralph.background.models import TaskDefinition, TriggerType, UserStatus
from ralph.background.run_store import UserStart
from ralph.config import Settings
from ralph.db import migrate
from ralph.db.engine import create_engine
from ralph.db.retry import is_unreachable, until_reachable
from ralph.testing.model_server import Delay, ModelServer, scripted, text
from ralph.testing.tcp_proxy import TcpProxy
from tests.helpers import (
    create_mariadb_database,
    create_postgres_database,
    drop_mariadb_database,
    drop_postgres_database,
    harness_for,
    serving,
    using_model_server,
)

pytestmark = pytest.mark.slow

USERS = [f"user-{i}" for i in range(10)]


async def eventually(condition: Callable[[], Awaitable[Any]], seconds: float = 60.0) -> Any:
    """Poll `condition` (state in another component, with no event to wait on)."""
    async with asyncio.timeout(seconds):
        while not (value := await condition()):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return value


async def outcomes(client: AsyncClient) -> tuple[dict[str, int], set[str]]:
    """(successes per user over all runs of the task, statuses of users not finished)."""
    successes: dict[str, int] = {}
    unfinished: set[str] = set()
    for run in (await client.get("/background/tasks/outage/runs")).json():
        detail = (await client.get(f"/background/runs/{run['id']}?users_limit=100")).json()
        for user in detail["user_results"]:
            if user["status"] == "success":
                successes[user["user_id"]] = successes.get(user["user_id"], 0) + 1
            if user["status"] in ("pending", "running"):
                unfinished.add(user["status"])
    return successes, unfinished


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer(scripted(Delay(0.5, text("ok")))) as server:
        yield server


@asynccontextmanager
async def serve(settings: Settings) -> AsyncGenerator[AsyncClient]:
    async with serving(settings) as client:
        task = {
            "name": "outage",
            "system_prompt": "review",
            "trigger": {"type": "cron", "schedule": "0 3 1 1 *"},
            "user_ids": USERS,
            "batch_size": 5,
        }
        assert (await client.post("/background/tasks", json=task)).status_code == 201
        yield client


async def start_run_and_wait_for_successes(client: AsyncClient, count: int) -> str:
    run_id: str = (await client.post("/background/tasks/outage/run")).json()["run_id"]

    async def some_done() -> bool:
        run = (await client.get(f"/background/runs/{run_id}")).json()
        return run["counts"].get("success", 0) >= count

    await eventually(some_done, 30)
    return run_id


async def all_done_once(client: AsyncClient) -> None:
    async def done() -> bool:
        successes, unfinished = await outcomes(client)
        return successes == dict.fromkeys(USERS, 1) and not unfinished

    await eventually(done)


def fault_settings(base: Settings, server: ModelServer, database_url: str) -> Settings:
    return using_model_server(
        base,
        server,
        database_url=database_url,
        scheduler_enabled=True,
        run_lease_seconds=2.0,
    )


@asynccontextmanager
async def server_behind_a_proxy(settings: Settings) -> AsyncGenerator[tuple[TcpProxy, str]]:
    """A migrated database of its own on the test's server (MariaDB or PostgreSQL), reached
    through a TCP proxy the test can cut: (the proxy, the database URL through it). Skips the
    test on SQLite."""
    postgres = settings.effective_database_url.startswith("postgresql")
    if not postgres and not settings.effective_database_url.startswith("mysql"):
        pytest.skip("a database server's case")
    url = await (create_postgres_database() if postgres else create_mariadb_database())
    engine = create_engine(url)
    await migrate.upgrade(engine)
    await engine.dispose()
    target = make_url(url)
    try:
        with TcpProxy(
            target.host or "127.0.0.1", target.port or (5432 if postgres else 3306)
        ) as proxy:
            proxied = target.set(host="127.0.0.1", port=proxy.port)
            yield proxy, proxied.render_as_string(hide_password=False)
    finally:
        await (drop_postgres_database(url) if postgres else drop_mariadb_database(url))


async def test_the_database_server_goes_away_mid_run_and_comes_back(
    settings: Settings, model_server: ModelServer
) -> None:
    async with (
        server_behind_a_proxy(settings) as (proxy, proxied_url),
        serve(fault_settings(settings, model_server, proxied_url)) as client,
    ):
        await start_run_and_wait_for_successes(client, 3)
        proxy.cut()
        assert (await client.get("/health")).status_code == 503
        await asyncio.sleep(2.0)
        assert (await client.get("/health")).status_code == 503
        proxy.restore()
        await eventually(lambda: _status(client, "/health", 200), 30)
        await all_done_once(client)


async def test_database_lost_right_after_a_claim_leaves_no_user_running(
    settings: Settings, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is cut the moment a user's claim commits, for 1 s: the unit still ends
    with the user's result recorded (interrupted: retrying, due at once), and raises nothing.
    Before, the run's mode was read after the claim, outside the unit's error handling: the
    unit raised, and the user stayed `running` (a run finished with `running=1`)."""
    async with server_behind_a_proxy(settings) as (proxy, proxied_url):
        configured = using_model_server(settings, model_server, database_url=proxied_url)
        async with harness_for(configured) as harness:
            services = harness.services
            task = TaskDefinition.model_validate(
                {
                    "name": "cut",
                    "system_prompt": "review",
                    "trigger": {"type": "cron", "schedule": "0 3 1 1 *"},
                    "user_ids": ["a"],
                }
            )
            await services.registry.create(task)
            run_id = await services.background.create_run(task, TriggerType.MANUAL)
            claim = services.runs.start_user

            async def claim_then_cut(*args: Any, **kwargs: Any) -> UserStart:
                start = await claim(*args, **kwargs)
                proxy.cut()
                asyncio.get_running_loop().call_later(1.0, proxy.restore)
                return start

            monkeypatch.setattr(services.runs, "start_user", claim_then_cut)
            await services.units.run_user(run_id, task, "a")
            user = await services.runs.user(run_id, "a")
            assert user.status in (UserStatus.RETRYING, UserStatus.SUCCESS), user
            if user.status is UserStatus.RETRYING:
                assert (user.reason, user.attempts) == ("interrupted", 1)


async def test_sqlite_locked_by_another_process_mid_run(
    settings: Settings, model_server: ModelServer
) -> None:
    """Another process holds the file's write lock for 3 s (less than the 30 s busy timeout):
    /health answers at once, the writers wait, and the run completes."""
    if not settings.effective_database_url.startswith("sqlite"):
        pytest.skip("the SQLite case")
    database = settings.effective_database_url.split("///", 1)[1]
    url = settings.effective_database_url
    async with serve(fault_settings(settings, model_server, url)) as client:
        await start_run_and_wait_for_successes(client, 3)
        # Taken from a thread: waiting for the lock on this event loop would stop the
        # in-process server, and with it the transaction that holds the lock (a deadlock).
        other = sqlite3.connect(database, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            await asyncio.to_thread(other.execute, "BEGIN EXCLUSIVE")
            for _ in range(3):
                # the probe answers at once, whatever the writers waiting for the lock do:
                # the database is there, and can be read (WAL)
                async with asyncio.timeout(2):
                    health = await client.get("/health")
                assert health.status_code == 200, health.text
                await asyncio.sleep(1.0)
        finally:
            await asyncio.to_thread(other.execute, "ROLLBACK")
            other.close()
        await eventually(partial(_status, client, "/health", 200), 30)
        await all_done_once(client)


async def _status(client: AsyncClient, path: str, expected: int) -> bool:
    return (await client.get(path)).status_code == expected


async def test_sqlite_reads_answer_while_another_process_writes(settings: Settings) -> None:
    """With the write lock held elsewhere (an agent process, a worker: here a plain sqlite3
    connection), requests that only read answer at once from WAL's snapshot, instead of
    waiting for the lock; a write waits for it, then lands."""
    if not settings.effective_database_url.startswith("sqlite"):
        pytest.skip("the SQLite case")
    database = settings.effective_database_url.split("///", 1)[1]
    async with serve(settings) as client:
        await client.put("/users/u1/blocks/notes", json={"body": "before"})
        other = sqlite3.connect(database, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
            write = asyncio.create_task(client.put("/users/u1/blocks/notes", json={"body": "x"}))
            async with asyncio.timeout(2):  # the busy timeout is 30 s
                blocks = (await client.get("/users/u1/blocks")).json()
                history = await client.get("/users/u1/blocks/notes/history")
                messages = await client.get("/users/u1/messages")
                tasks = await client.get("/background/tasks")
            assert [b["body"] for b in blocks] == ["before"]
            assert [r.status_code for r in (history, messages, tasks)] == [200, 200, 200]
            assert not write.done()  # the writer waits for the lock
        finally:
            await asyncio.to_thread(other.execute, "ROLLBACK")
            other.close()
        assert (await write).json()["body"] == "x"


async def test_a_write_past_the_packet_size_is_not_an_outage(mariadb_schema_url: str) -> None:
    """MariaDB drops the connection of a statement past max_allowed_packet (2013, as when it
    goes away, or 2006 when the next one is sent on the connection it closed): the write that
    waits out outages gives up after three such losses in a row, instead of retrying it for 10
    minutes with the user left `running`."""
    engine = create_engine(mariadb_schema_url)
    huge = "x" * (17 * 1024 * 1024)  # past the default 16 MB
    attempts = 0

    async def write() -> None:
        nonlocal attempts
        attempts += 1
        async with engine.begin() as conn:
            await conn.exec_driver_sql("SELECT CHAR_LENGTH(%s)", (huge,))

    try:
        with pytest.raises(OperationalError) as raised:
            await until_reachable(write, what="a huge write", give_up_after=600)
        assert "2013" in str(raised.value) or "2006" in str(raised.value)
        assert attempts == 3
    finally:
        await engine.dispose()


async def test_a_connection_dropped_mid_statement_is_an_outage() -> None:
    """asyncpg reports a connection dropped during a statement as a plain DBAPIError that
    SQLAlchemy marks `connection_invalidated`: it is waited out like any outage (it was raised
    at once, and the PostgreSQL outage test failed when the cut hit a statement)."""
    dropped = DBAPIError(
        "SELECT 1", {}, Exception("connection was closed in the middle of operation"), False, True
    )
    assert dropped.connection_invalidated
    assert is_unreachable(dropped)
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise dropped
        return "answered"

    assert await until_reachable(flaky, what="test", give_up_after=5) == "answered"
    assert len(calls) == 2
    refused = DBAPIError("SELECT 1", {}, Exception("syntax error"), False, False)
    assert not is_unreachable(refused)
