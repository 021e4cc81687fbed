"""Idle-trigger selection time against the size of the activity table, and the pass of a
cron task read in each user's local time.

For each size (default 10k, 100k, 1M users, all in the task's list), 99% of users went idle
before the task's watermark (examined already) and 1% became idle since: the tick must find
exactly those. Prints the selection time (median of 5) on SQLite and, when reachable, MariaDB
and PostgreSQL.

Local time: 100,000 users spread over 40 timezones, one cron task `"timezone": "user"`; the
scheduler's pass over it (group the users by timezone, each zone's next slot) against the
same pass over a task with one fixed timezone and the same users (the baseline, same run),
and the read of one due zone's users.

    uv run python bench/scheduler.py [sizes...]      e.g. 10000 100000
    uv run python bench/scheduler.py --local-time [users]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("AGNO_TELEMETRY", "false")

from sqlalchemy import update

from ralph.background.models import CronTrigger, IdleTrigger, TaskDefinition
from ralph.composition import open_services
from ralph.config import Settings
from ralph.db.tables import background_tasks, task_users, user_activity, user_profiles
from ralph.logs import configure_logging
from ralph.testing.clock import FakeClock
from ralph.testing.databases import SERVERS, Unreachable
from ralph.users.store import ProfileStore

NOW = datetime(2026, 6, 1, tzinfo=UTC)
CHUNK = 10_000


async def run_size(url: str, users: int) -> tuple[float, int, float]:
    settings = Settings(
        database_url=url,
        data_dir=Path(tempfile.gettempdir()),
        worker_mode="inprocess",  # no agent runs here: no agent process
        _env_file=None,  # type: ignore[call-arg]
    )
    clock = FakeClock(NOW)
    async with open_services(settings, clock=clock) as services:
        trigger = IdleTrigger(idle_minutes=30, cooldown_minutes=60)
        task = TaskDefinition(
            name="idle-bench", system_prompt="x", trigger=trigger, user_ids=["seed"]
        )
        await services.registry.create(task)
        watermark = NOW - timedelta(hours=1)
        due_every = 100  # 1% due
        async with services.engine.begin() as conn:
            await conn.execute(task_users.delete())
            for start in range(0, users, CHUNK):
                ids = range(start, min(start + CHUNK, users))
                await conn.execute(
                    task_users.insert(),
                    [{"task_name": "idle-bench", "user_id": f"u{i}", "position": i} for i in ids],
                )
                await conn.execute(
                    user_activity.insert(),
                    [
                        {
                            "user_id": f"u{i}",
                            "last_message_at": (NOW - timedelta(minutes=45))
                            if i % due_every == 0
                            # 1% still active: the next idle check is due 30 min after them
                            else (NOW - timedelta(minutes=10, seconds=i % 600))
                            if i % due_every == 50
                            else (NOW - timedelta(days=3, seconds=i)),
                        }
                        for i in ids
                    ],
                )
            await conn.execute(update(background_tasks).values(idle_watermark=watermark))
        scheduler = services.scheduler
        timings: list[float] = []
        found = 0
        for _ in range(5):
            started = time.perf_counter()
            due = (await scheduler.idle.due_users("idle-bench", trigger, NOW)).due
            timings.append(time.perf_counter() - started)
            found = len(due)
        # the query that bounds the loop's sleep: the oldest active user's due time
        stored = await services.registry.get("idle-bench")
        wakes: list[float] = []
        for _ in range(5):
            started = time.perf_counter()
            await scheduler.idle.next_check(stored, NOW)
            wakes.append(time.perf_counter() - started)
        return statistics.median(timings) * 1000, found, statistics.median(wakes) * 1000


# 40 zones, west to east: most distinct offsets, some sharing one (Berlin and Paris)
ZONES = [
    "Pacific/Honolulu", "America/Anchorage", "America/Los_Angeles", "America/Denver",
    "America/Chicago", "America/New_York", "America/Halifax", "America/Sao_Paulo",
    "Atlantic/Azores", "UTC", "Europe/London", "Europe/Lisbon", "Europe/Berlin",
    "Europe/Paris", "Europe/Madrid", "Africa/Lagos", "Europe/Athens", "Africa/Cairo",
    "Europe/Moscow", "Asia/Tehran", "Asia/Dubai", "Asia/Kabul", "Asia/Karachi",
    "Asia/Kolkata", "Asia/Kathmandu", "Asia/Dhaka", "Asia/Yangon", "Asia/Bangkok",
    "Asia/Shanghai", "Asia/Singapore", "Australia/Perth", "Asia/Tokyo", "Asia/Seoul",
    "Australia/Adelaide", "Australia/Sydney", "Pacific/Noumea", "Pacific/Auckland",
    "Pacific/Chatham", "Pacific/Tongatapu", "Pacific/Kiritimati",
]  # fmt: skip


async def local_time_pass(url: str, users: int) -> tuple[float, float, float, int]:
    """(per-user pass ms, fixed-timezone pass ms, one zone's users ms, that zone's users)."""
    settings = Settings(
        database_url=url,
        data_dir=Path(tempfile.gettempdir()),
        worker_mode="inprocess",
        _env_file=None,  # type: ignore[call-arg]
    )
    clock = FakeClock(NOW)
    async with open_services(settings, clock=clock) as services:
        for name, zone in (("local", "user"), ("fixed", "Europe/Berlin")):
            trigger = CronTrigger(schedule="0 3 * * *", timezone=zone)
            await services.registry.create(
                TaskDefinition(name=name, system_prompt="x", trigger=trigger, user_ids=["seed"])
            )
        async with services.engine.begin() as conn:
            await conn.execute(task_users.delete())
            for start in range(0, users, CHUNK):
                ids = range(start, min(start + CHUNK, users))
                for name in ("local", "fixed"):
                    await conn.execute(
                        task_users.insert(),
                        [{"task_name": name, "user_id": f"u{i}", "position": i} for i in ids],
                    )
                await conn.execute(
                    user_profiles.insert(),
                    [
                        {
                            "user_id": f"u{i}",
                            "timezone": ZONES[i % len(ZONES)],
                            "metadata": "{}",
                            "timezone_changed_at": NOW - timedelta(days=30),
                            "updated_at": NOW - timedelta(days=30),
                        }
                        for i in ids
                    ],
                )
        scheduler = services.scheduler
        passes: dict[str, list[float]] = {"local": [], "fixed": []}
        for _ in range(5):
            for name in passes:
                await services.registry.set_enabled("fixed", name == "fixed")
                await services.registry.set_enabled("local", name == "local")
                await scheduler.tick()  # the registry's refresh, outside the timing
                started = time.perf_counter()
                await scheduler.tick()
                passes[name].append(time.perf_counter() - started)
        profiles = ProfileStore(services.engine)
        reads: list[float] = []
        found = 0
        for _ in range(5):
            started = time.perf_counter()
            found = len(await profiles.users_in_zones("local", ["Asia/Tokyo"], "UTC"))
            reads.append(time.perf_counter() - started)
        return (
            statistics.median(passes["local"]) * 1000,
            statistics.median(passes["fixed"]) * 1000,
            statistics.median(reads) * 1000,
            found,
        )


async def local_time(users: int) -> None:
    configure_logging("warning", json=True)
    print(f"cron in users' local time: {users:,} users over {len(ZONES)} timezones, median of 5")
    print("pass: one scheduler tick with only that task enabled, nothing due")
    with tempfile.TemporaryDirectory() as tmp:
        figures = await local_time_pass(f"sqlite+aiosqlite:///{tmp}/bench.db", users)
    rows = [("sqlite", figures)]
    for server in SERVERS:
        url = await server_url(server)
        if url is not None:
            try:
                rows.append((server, await local_time_pass(url, users)))
            finally:
                await SERVERS[server].drop_database(url)
    for backend, (local, fixed, read, found) in rows:
        print(
            f"  {backend:8} per-user pass={local:7.2f} ms  fixed-timezone pass={fixed:6.2f} ms "
            f"(x{local / fixed:.1f})  one zone's users ({found:,})={read:6.2f} ms"
        )


async def server_url(server: str) -> str | None:
    """A new database on `server` (None: the server does not answer)."""
    try:
        return await SERVERS[server].create_database("ralph_bench")
    except Unreachable:
        return None


async def main(sizes: list[int]) -> None:
    configure_logging("warning", json=True)
    print("idle selection, 1% of users due (1% more still active), median of 5 ticks;")
    print("next due: the query that bounds the loop's sleep (oldest active user + idle_minutes)")
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            ms, found, wake = await run_size(f"sqlite+aiosqlite:///{tmp}/bench.db", size)
        print(
            f"  sqlite   users={size:>9,} due={found:>6,} selection={ms:8.2f} ms "
            f"next due={wake:6.2f} ms"
        )
        for server in SERVERS:
            url = await server_url(server)
            if url is None:
                print(f"  {server:8} not reachable, skipped")
                continue
            try:
                ms, found, wake = await run_size(url, size)
                print(
                    f"  {server:8} users={size:>9,} due={found:>6,} selection={ms:8.2f} ms "
                    f"next due={wake:6.2f} ms"
                )
            finally:
                await SERVERS[server].drop_database(url)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--local-time"]:
        asyncio.run(local_time(int(sys.argv[2]) if len(sys.argv) > 2 else 100_000))
    else:
        sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000, 1_000_000]
        asyncio.run(main(sizes))
