"""The review side at scale: 1,000 pending proposals across 100 users (SQLite).

Prints, median of 5 (server time: the request through the ASGI app in this process, no
network), the review queue's first page (`GET /proposals?status=pending`, 100 newest) against
the same page with an empty queue (baseline, same run); the console's queue page
(`GET /console`: 50 proposals, each diffed against its block's current text of 60 lines,
rendered) against the API's page and the empty console (baselines, same run); then one run's
1,000 proposals
approved with `POST /proposals/approve {"run_id"}` against 1,000 `POST /proposals/{id}/approve`
calls (baseline, same run, on another 1,000); last, a task's stats
(`GET /background/tasks/{name}/stats?days=30`) over 100,000 decided proposals of 30 days
against the review queue's first page (baseline, same run).

    uv run python bench/review.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update

os.environ.setdefault("AGNO_TELEMETRY", "false")

from httpx import ASGITransport, AsyncClient

from ralph.app import create_app
from ralph.background.models import CronTrigger, TaskDefinition
from ralph.composition import Services
from ralph.config import Settings
from ralph.db.tables import background_tasks, proposals
from ralph.logs import configure_logging
from ralph.memory.models import ProposalDraft

USERS = 100
PROPOSALS = 1_000


async def timed_page(client: AsyncClient, path: str = "/proposals") -> float:
    """Median ms of 5 GETs of `path` (the API's queue page, or the console's)."""
    params = {"status": "pending", "limit": 100} if path == "/proposals" else {}
    timings: list[float] = []
    for _ in range(5):
        started = time.perf_counter()
        answer = await client.get(path, params=params)
        timings.append(time.perf_counter() - started)
        answer.raise_for_status()
    return statistics.median(timings) * 1000


STATS_PROPOSALS = 100_000
OUTCOMES = ("approved", "approved", "rejected", "superseded", "expired", "pending")


async def decided_history(services: Services) -> None:
    """A task with 100,000 proposals over the last 30 days, most of them decided."""
    await services.registry.create(
        TaskDefinition(
            name="statsbench",
            system_prompt="x",
            trigger=CronTrigger(schedule="0 3 * * *"),
            user_ids=[f"user{i}" for i in range(USERS)],
        )
    )
    now = datetime.now(UTC)
    async with services.engine.begin() as conn:
        await conn.execute(
            update(background_tasks)
            .where(background_tasks.c.name == "statsbench")
            .values(created_at=now - timedelta(days=31))
        )
        for start in range(0, STATS_PROPOSALS, 5_000):
            rows: list[dict[str, object]] = []
            for i in range(start, start + 5_000):
                status = OUTCOMES[i % len(OUTCOMES)]
                at = now - timedelta(days=30) + timedelta(seconds=i * 25)
                rows.append(
                    {
                        "id": str(uuid.uuid4()),
                        "user_id": f"user{i % USERS}",
                        "label": f"note{i % 5}",
                        "kind": "append",
                        "new_text": f"line {i}",
                        "reason": "nightly",
                        "author": "agent:statsbench",
                        "base_version": 0,
                        "status": status,
                        "diff": "",
                        "created_at": at,
                        "decided_at": None if status == "pending" else at,
                        "edited": i % 12 == 0,
                    }
                )
            await conn.execute(proposals.insert(), rows)


async def main() -> None:
    configure_logging("warning", json=True)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{tmp}/review.db",
            data_dir=Path(tmp),
            worker_mode="inprocess",
            scheduler_enabled=False,
            _env_file=None,  # type: ignore[call-arg]
        )
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            AsyncClient(transport=ASGITransport(app=app), base_url="http://bench") as client,
        ):
            memory = app.state.services.memory
            empty = await timed_page(client)
            console_empty = await timed_page(client, "/console")

            async def propose(run_id: str) -> list[str]:
                ids: list[str] = []
                for i in range(PROPOSALS):
                    # one block per proposal: appends to 10 blocks of each of 100 users
                    draft = ProposalDraft(
                        user_id=f"user{i % USERS}",
                        label=f"note{i // USERS}",
                        reason="nightly review",
                        author=f"agent:{run_id}",
                        append=f"{run_id} line {i} " + "words " * 30,
                        run_id=run_id,
                    )
                    ids.append((await memory.propose(draft))[0].id)
                return ids

            # the blocks the first page's proposals append to hold 60 lines each: the console
            # diffs each proposal against that text (folding the unchanged lines)
            text = "\n".join(f"line {n}: " + "words " * 12 for n in range(60))
            last_label = f"note{(PROPOSALS - 1) // USERS}"
            for user in range(USERS):
                await memory.put_block(
                    f"user{user}", last_label, title="Notes", body=text, author="bench"
                )
            await propose("bulk")
            full = await timed_page(client)
            console = await timed_page(client, "/console")
            started = time.perf_counter()
            answer = await client.post("/proposals/approve", json={"run_id": "bulk"})
            bulk = time.perf_counter() - started
            decided = sum(1 for r in answer.json() if r["decided"])
            singles = await propose("single")
            started = time.perf_counter()
            for proposal_id in singles:
                (await client.post(f"/proposals/{proposal_id}/approve")).raise_for_status()
            single = time.perf_counter() - started
            await decided_history(app.state.services)
            queue_page = await timed_page(client)
            stats = await timed_page(client, "/background/tasks/statsbench/stats?days=30")
    print(f"review queue, first page of 100 ({PROPOSALS:,} pending across {USERS} users):")
    print(f"  {full:7.2f} ms   (empty queue, baseline: {empty:.2f} ms; x{full / empty:.1f})")
    print("console review queue (/console), first page of 50 with diffs:")
    print(
        f"  {console:7.2f} ms   (API page above, baseline: x{console / full:.1f}; "
        f"empty console: {console_empty:.2f} ms)"
    )
    print(f"approve a run's {PROPOSALS:,} proposals ({decided:,} decided):")
    print(
        f"  bulk {bulk:6.2f} s   (1,000 single approvals, baseline: {single:.2f} s; "
        f"x{bulk / single:.2f})"
    )
    print(f"a task's stats over 30 days, {STATS_PROPOSALS:,} proposals (most decided):")
    print(
        f"  {stats:7.2f} ms   (review queue's first page, baseline: {queue_page:.2f} ms; "
        f"x{stats / queue_page:.1f})"
    )


if __name__ == "__main__":
    asyncio.run(main())
