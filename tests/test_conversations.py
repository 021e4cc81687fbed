"""Messages and user activity, on SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from httpx import AsyncClient
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.conversations.models import Role
from ralph.conversations.store import ConversationStore
from ralph.db import migrate
from ralph.db.engine import create_engine, create_read_engine
from ralph.testing.clock import FakeClock


async def test_user_message_records_activity(client: AsyncClient, clock: FakeClock) -> None:
    assert (await client.get("/users/u1/activity")).json()["last_message_at"] is None
    await client.post("/users/u1/messages", json={"role": "user", "content": "hi"})
    first = (await client.get("/users/u1/activity")).json()["last_message_at"]
    assert datetime.fromisoformat(first) == clock.now()

    await clock.advance(60)
    await client.post("/users/u1/messages", json={"role": "assistant", "content": "hello"})
    unchanged = (await client.get("/users/u1/activity")).json()["last_message_at"]
    assert unchanged == first  # only the user's own messages count

    await client.post("/users/u1/messages", json={"content": "another"})
    later = (await client.get("/users/u1/activity")).json()["last_message_at"]
    assert datetime.fromisoformat(later) == clock.now()


async def test_activity_only_moves_forward(client: AsyncClient, clock: FakeClock) -> None:
    now = clock.now()
    await client.post("/users/u2/activity", json={"at": now.isoformat()})
    older = (now - timedelta(hours=1)).isoformat()
    response = await client.post("/users/u2/activity", json={"at": older})
    assert datetime.fromisoformat(response.json()["last_message_at"]) == now
    naive = await client.post("/users/u2/activity", json={"at": "2026-01-01T00:00:00"})
    assert naive.status_code == 422


async def test_activity_in_the_future_is_refused(client: AsyncClient, clock: FakeClock) -> None:
    skewed = (clock.now() + timedelta(minutes=4)).isoformat()
    assert (await client.post("/users/u3/activity", json={"at": skewed})).status_code == 200
    ahead = (clock.now() + timedelta(hours=1)).isoformat()
    response = await client.post("/users/u3/activity", json={"at": ahead})
    assert response.status_code == 422
    assert "in the future" in response.json()["detail"]
    assert datetime.fromisoformat(
        (await client.get("/users/u3/activity")).json()["last_message_at"]
    ) == datetime.fromisoformat(skewed)


async def test_messages_page_and_search(client: AsyncClient) -> None:
    for i in range(5):
        await client.post("/users/u1/messages", json={"content": f"message {i} about 100%"})
    await client.post("/users/u2/messages", json={"content": "message for someone else"})
    newest = (await client.get("/users/u1/messages", params={"limit": 2})).json()
    assert [m["content"][:9] for m in newest] == ["message 4", "message 3"]
    older = (
        await client.get("/users/u1/messages", params={"limit": 10, "before": newest[-1]["id"]})
    ).json()
    assert [m["content"][:9] for m in older] == ["message 2", "message 1", "message 0"]
    found = (await client.get("/users/u1/messages", params={"q": "MESSAGE 3"})).json()
    assert [m["content"] for m in found] == ["message 3 about 100%"]
    percent = (await client.get("/users/u1/messages", params={"q": "0%"})).json()
    assert len(percent) == 5  # '%' is literal, not a wildcard
    assert (await client.get("/users/u1/messages", params={"q": "_"})).json() == []


async def test_message_validation(client: AsyncClient) -> None:
    assert (await client.post("/users/u1/messages", json={"content": ""})).status_code == 422
    bad_role = await client.post("/users/u1/messages", json={"role": "robot", "content": "x"})
    assert bad_role.status_code == 422
    assert (await client.post("/users/a..b/messages", json={"content": "x"})).status_code == 422


def test_fake_clock_starts_aware() -> None:
    assert FakeClock().now().tzinfo is UTC


async def test_search_uses_the_full_text_index(client: AsyncClient) -> None:
    """A word in another form is found through the database's full-text index ("cats" was
    not a substring of "cat"); parts of words still match."""
    for content in ("I have a cat named Miso", "exams next week", "room 101"):
        assert (await client.post("/users/u1/messages", json={"content": content})).is_success
    found = (await client.get("/users/u1/messages", params={"q": "how are the cats"})).json()
    assert [m["content"] for m in found] == ["I have a cat named Miso"]
    exams = (await client.get("/users/u1/messages", params={"q": "exam"})).json()
    assert [m["content"] for m in exams] == ["exams next week"]
    part = (await client.get("/users/u1/messages", params={"q": "10"})).json()
    assert [m["content"] for m in part] == ["room 101"]


async def test_the_search_index_follows_deleted_messages(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    kept = await store.add_message("u1", Role.USER, "my cats are called Miso", at)
    gone = await store.add_message("u1", Role.USER, "the cat sat on the mat", at)
    await store.delete_messages([gone.id])
    await store.add_message("u2", Role.USER, "a cat of someone else", at)
    assert [m.id for m in await store.search_messages("u1", "cat")] == [kept.id]


async def test_a_read_of_one_statement_sends_no_begin(tmp_path: Path) -> None:
    """On SQLite a point read needs no BEGIN (a statement reads a snapshot by itself): one
    trip to the driver's thread fewer. A read of several statements still begins."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'ralph.db'}"
    engine = create_engine(url)
    reads = create_read_engine(url)
    assert reads is not None
    sent: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        sent.append(statement.split()[0].upper())

    try:
        await migrate.upgrade(engine)
        event.listen(reads.sync_engine, "before_cursor_execute", seen)
        store = ConversationStore(engine, reads)
        assert await store.last_activity("u1") is None
        assert sent == ["SELECT"]
        sent.clear()
        async with reads.connect() as conn:
            await conn.execute(select(1))
        assert sent == ["BEGIN", "SELECT"]
    finally:
        await engine.dispose()
        await reads.dispose()
