"""Message search at scale: `query_messages` / `GET /users/{id}/messages?q=` for a user with
many messages, in a table of many users, on SQLite, MariaDB and PostgreSQL.

Each figure is the mean of 5 searches after a warm-up; the baseline of the same run is the
substring match alone (what the search was before the full-text index), so the ratio says
what the index's part costs or saves.

    uv run python bench/search.py [own messages] [other users' messages]   e.g. 20000 100000
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime

from sqlalchemy import func, or_, select

os.environ.setdefault("AGNO_TELEMETRY", "false")

from ralph.conversations.search import query_words
from ralph.conversations.store import SEARCH_CANDIDATES, ConversationStore
from ralph.db import migrate
from ralph.db.engine import create_engine, create_read_engine, one_statement
from ralph.db.tables import messages
from ralph.logs import configure_logging
from ralph.testing.databases import SERVERS, Unreachable

WORDS = [
    "exam",
    "friday",
    "nervous",
    "subjunctive",
    "integrals",
    "video",
    "chess",
    "piano",
    "kanji",
    "berlin",
    "shift",
    "evening",
    "lesson",
    "coursework",
    "dyslexia",
    "python",
    "sql",
    "job",
    "march",
    "weekend",
]
FILLER = [
    "the",
    "a",
    "and",
    "to",
    "of",
    "it",
    "is",
    "was",
    "we",
    "that",
    "this",
    "for",
    "with",
    "you",
    "i",
    "my",
    "on",
    "at",
    "so",
    "but",
]
QUERIES = ("cat Miso", "exam nervous", "zebra")
ROUNDS = 5


async def timed(search: object) -> float:
    """Mean milliseconds of `ROUNDS` calls of `search` (a coroutine function), after one."""
    await search()  # type: ignore[operator]
    started = time.perf_counter()
    for _ in range(ROUNDS):
        await search()  # type: ignore[operator]
    return 1000 * (time.perf_counter() - started) / ROUNDS


async def measure(name: str, url: str, own: int, others: int) -> None:
    engine = create_engine(url)
    reads = create_read_engine(url)
    await migrate.upgrade(engine)
    rng = random.Random(1)
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def row(user: str) -> dict[str, object]:
        words = [rng.choice(FILLER) for _ in range(10)] + [rng.choice(WORDS) for _ in range(2)]
        rng.shuffle(words)
        return {"user_id": user, "role": "user", "content": " ".join(words), "created_at": at}

    rows = [row("me") for _ in range(own)] + [row(f"u{i % 1000}") for i in range(others)]
    async with engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            await conn.execute(messages.insert(), rows[start : start + 5000])
    store = ConversationStore(engine, reads)
    try:
        for text in QUERIES:

            async def search(text: str = text) -> None:
                await store.search_messages("me", text)

            async def substrings(text: str = text) -> None:
                likes = [func.lower(messages.c.content).like(f"%{w}%") for w in query_words(text)]
                query = (
                    select(messages)
                    .where(messages.c.user_id == "me", or_(*likes))
                    .order_by(messages.c.id.desc())
                    .limit(SEARCH_CANDIDATES)
                )
                async with one_statement(reads or engine) as conn:
                    (await conn.execute(query)).all()

            mine, baseline = await timed(search), await timed(substrings)
            print(
                f"  {name:8} q={text!r:15} search {mine:7.1f} ms   substrings alone "
                f"{baseline:7.1f} ms   ratio {mine / baseline:.2f}x"
            )
    finally:
        await store.aclose()
        await engine.dispose()
        if reads is not None:
            await reads.dispose()


async def main(own: int, others: int) -> None:
    configure_logging("warning", json=True)
    print(f"a user of {own:,} messages among {others:,} of 1,000 other users; mean of {ROUNDS}")
    with tempfile.TemporaryDirectory() as tmp:
        await measure("sqlite", f"sqlite+aiosqlite:///{tmp}/search.db", own, others)
    for name, server in SERVERS.items():
        try:
            url = await server.create_database("ralph_bench")
        except Unreachable:
            print(f"  {name:8} not reachable, skipped")
            continue
        try:
            await measure(name, url, own, others)
        finally:
            await server.drop_database(url)


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 20_000,
            int(sys.argv[2]) if len(sys.argv) > 2 else 100_000,
        )
    )
