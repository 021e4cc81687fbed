"""Activity writes per second for 100k users, through the store and through the HTTP API.

The HTTP figure uses a real server (`ralph serve` in a subprocess on the embedded SQLite
default) and 32 concurrent clients; the store figure calls ConversationStore directly.

    uv run python bench/activity.py [users] [http_users]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Generator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

os.environ.setdefault("AGNO_TELEMETRY", "false")

from ralph.composition import open_services
from ralph.config import Settings
from ralph.logs import configure_logging
from ralph.testing.processes import free_port, start_server_process

CONCURRENCY = 32


async def through_store(users: int, data_dir: Path) -> float:
    settings = Settings(data_dir=data_dir, worker_mode="inprocess", _env_file=None)  # type: ignore[call-arg]
    async with open_services(settings) as services:
        store = services.conversations
        start_at = datetime(2026, 1, 1, tzinfo=UTC)
        started = time.perf_counter()
        for i in range(users):
            await store.record_activity(f"user-{i}", start_at + timedelta(seconds=i))
        return users / (time.perf_counter() - started)


@contextmanager
def ralph_server(data_dir: Path) -> Generator[str]:
    """`ralph serve` on the embedded SQLite default, in its own process; yields its URL."""
    port = free_port()
    env = {
        "RALPH_DATA_DIR": str(data_dir),
        "RALPH_LOG_LEVEL": "warning",
        "RALPH_SCHEDULER_ENABLED": "false",
    }
    server = start_server_process(port, env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


async def through_http(users: int, base: str) -> float:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        queue = iter(range(users))

        async def worker() -> None:
            for i in queue:
                response = await client.post(f"/users/user-{i}/activity")
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])
        return users / (time.perf_counter() - started)


def main(users: int, http_users: int) -> None:
    configure_logging("warning", json=True)
    with tempfile.TemporaryDirectory() as tmp:
        rate = asyncio.run(through_store(users, Path(tmp) / "store"))
        print(f"store: {users:,} users, {rate:,.0f} activity writes/s (SQLite, one at a time)")
        with ralph_server(Path(tmp) / "http") as base:
            rate = asyncio.run(through_http(http_users, base))
        print(
            f"http:  {http_users:,} users, {rate:,.0f} activity writes/s "
            f"(ralph serve on SQLite, {CONCURRENCY} concurrent clients)"
        )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(args[0] if args else 100_000, args[1] if len(args) > 1 else 100_000)
