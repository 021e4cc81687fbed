"""Group commit of messages and activity: writes that arrive together share one transaction,
a bad write fails alone, and nothing acknowledged is lost on kill -9."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.conversations.models import Message, Role
from ralph.conversations.store import ConversationStore
from ralph.db.group_commit import GroupCommit
from ralph.db.tables import user_activity
from ralph.testing.processes import free_port, start_server_process
from tests.helpers import empty_database, wait_for

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def test_writes_that_arrive_together_share_a_transaction(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    try:
        writes = [
            store.add_message(f"u{i % 5}", Role.USER if i % 3 else Role.ASSISTANT, f"m{i}", AT)
            for i in range(40)
        ]
        # two times for one user in the same batch: both learn the later
        activity = [
            store.record_activity("a1", AT + timedelta(minutes=2)),
            store.record_activity("a1", AT + timedelta(minutes=1)),
            store.record_activity("u1", AT - timedelta(hours=1)),
        ]
        results = await asyncio.gather(*writes, *activity)
        made = [r for r in results[:40] if isinstance(r, Message)]
        assert [m.content for m in made] == [f"m{i}" for i in range(40)]
        ids = [m.id for m in made]
        assert ids == sorted(ids)  # in the writes' order
        assert len(set(ids)) == 40
        assert results[40:] == [AT + timedelta(minutes=2)] * 2 + [AT]  # u1's message at AT
        assert store.batches <= 3, store.batches  # not 43 transactions
        stored = await store.list_messages("u1", limit=100)
        assert sorted(m.id for m in stored) == [m.id for m in made if m.user_id == "u1"]
        assert await store.last_activity("u0") == AT  # u0 said something (i = 5, 10, ...)
        assert await store.last_activity("u3") == AT
    finally:
        await store.aclose()


async def test_reads_that_arrive_together_are_one_statement(engine: AsyncEngine) -> None:
    """Users' latest activity read by 30 requests at once: one or two SELECTs, not 30; each
    answer is its user's."""
    store = ConversationStore(engine)
    selects: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    try:
        await store.record_activity("a", AT)
        await store.record_activity("c", AT + timedelta(minutes=1))
        event.listen(engine.sync_engine, "before_cursor_execute", seen)
        found = await asyncio.gather(*(store.last_activity(u) for u in ["a", "b", "c"] * 10))
        assert found == [AT, None, AT + timedelta(minutes=1)] * 10
        assert 1 <= len(selects) <= 2, selects
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
        await store.aclose()


async def test_a_bad_write_fails_alone(engine: AsyncEngine) -> None:
    async def write(conn: AsyncConnection, users: Sequence[str]) -> list[str]:
        for user in users:
            await conn.execute(user_activity.insert().values(user_id=user, last_message_at=AT))
            if user == "bad":
                raise ValueError("refused")
        return list(users)

    group = GroupCommit(engine, write)
    try:
        results = await asyncio.gather(
            *(group.submit(user) for user in ("a", "b", "bad", "c")), return_exceptions=True
        )
        assert results[:2] == ["a", "b"]
        assert results[3] == "c"
        assert isinstance(results[2], ValueError)
        async with engine.connect() as conn:
            stored = (await conn.execute(select(user_activity.c.user_id))).scalars().all()
        assert sorted(stored) == ["a", "b", "c"]
    finally:
        await group.aclose()


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
def server_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database a server process migrates itself."""
    yield from empty_database(request.param, tmp_path)


@pytest.mark.slow
def test_nothing_acknowledged_is_lost_on_kill_9(server_database: str, tmp_path: Path) -> None:
    """32 clients post messages as fast as they are answered; the server is killed with
    SIGKILL mid-stream. After a restart every message that was answered 201 is there, and
    each user's activity is at least that of their last answered message."""
    port = free_port()
    env = {
        "RALPH_DATABASE_URL": server_database,
        "RALPH_DATA_DIR": str(tmp_path / "data"),
        "RALPH_SCHEDULER_ENABLED": "false",
    }
    server = start_server_process(port, env)
    api = f"http://127.0.0.1:{port}"
    answered: list[dict[str, str]] = []
    enough = asyncio.Event()

    async def client(number: int, http: httpx.AsyncClient) -> None:
        for i in range(10_000):
            content = f"message {i} of client {number}"
            try:
                response = await http.post(f"/users/c{number}/messages", json={"content": content})
            except httpx.HTTPError:
                return  # the server is gone
            if response.status_code == 201:
                answered.append(response.json())
                if len(answered) >= 300:
                    enough.set()

    async def load() -> None:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=api, limits=limits, timeout=10) as http:
            clients = [asyncio.create_task(client(n, http)) for n in range(32)]
            await enough.wait()
            server.kill()  # SIGKILL: no shutdown, no flush
            await asyncio.gather(*clients)

    try:
        asyncio.run(load())
    finally:
        server.kill()
        server.wait()
    server = start_server_process(port, env)
    try:
        by_user: dict[str, list[dict[str, str]]] = {}
        for message in answered:
            by_user.setdefault(message["user_id"], []).append(message)
        for user_id, sent in by_user.items():
            assert len(sent) < 500
            stored = httpx.get(f"{api}/users/{user_id}/messages", params={"limit": 500}).json()
            kept = {(m["id"], m["content"]) for m in stored}
            lost = [m for m in sent if (m["id"], m["content"]) not in kept]
            assert not lost, lost
            activity = httpx.get(f"{api}/users/{user_id}/activity").json()["last_message_at"]
            latest = max(datetime.fromisoformat(m["created_at"]) for m in sent)
            assert datetime.fromisoformat(activity) >= latest
    finally:
        server.terminate()
        wait_for(lambda: server.poll() is not None, timeout=30)
        if server.poll() is None:
            server.kill()
