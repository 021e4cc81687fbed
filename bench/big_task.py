"""How long a task of 100,000 users holds up other requests: create, replace, run, cancel.

A real server (uvicorn, in this process's event loop), SQLite unless `--database-url` names an
empty, migrated database. While each request runs, a
client polls GET /health every 5 ms; the figure is the slowest /health answer during the
request, against the slowest one with the server idle, measured in the same run.

    python bench/big_task.py [--users 100000] [--database-url mysql+asyncmy://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from ralph.app import create_app
from ralph.config import Settings
from ralph.testing.processes import free_port

os.environ.setdefault("AGNO_TELEMETRY", "false")


async def slowest_health(client: httpx.AsyncClient, stop: asyncio.Event) -> float:
    worst = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        await client.get("/health")
        worst = max(worst, time.perf_counter() - started)
        await asyncio.sleep(0.005)
    return worst


async def during(client: httpx.AsyncClient, request: Any) -> tuple[float, float, int]:
    """(seconds the request took, slowest /health meanwhile, status)."""
    stop = asyncio.Event()
    poller = asyncio.create_task(slowest_health(client, stop))
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    answer = await request
    took = time.perf_counter() - started
    stop.set()
    return took, await poller, answer.status_code


async def main(users: int, database_url: str | None) -> None:
    data = Path(tempfile.mkdtemp())
    settings = Settings(
        data_dir=data,
        database_url=database_url,
        scheduler_enabled=False,
        model_provider="dev",
        log_level="warning",
        _env_file=None,  # type: ignore[call-arg]
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    task = {
        "name": "big",
        "system_prompt": "review",
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": [f"user-{i:06d}" for i in range(users)],
        "batch_size": 50,
    }
    replaced = task | {"batch_size": 40}
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as poller,
    ):
        for _ in range(20):  # warm up: connections, the migration scripts /health reads
            await poller.get("/health")
        stop = asyncio.Event()
        idle_poll = asyncio.create_task(slowest_health(poller, stop))
        await asyncio.sleep(1.0)
        stop.set()
        idle = await idle_poll
        print(f"users {users:,}; slowest /health when idle: {idle * 1000:.1f} ms")
        print(f"{'request':<10} {'took s':>8} {'slowest /health ms':>19} {'x idle':>8}")
        steps: list[tuple[str, Any]] = [
            ("create", lambda: client.post("/background/tasks", json=task)),
            ("replace", lambda: client.put("/background/tasks/big", json=replaced)),
            ("run", lambda: client.post("/background/tasks/big/run")),
        ]
        run_id = ""
        for name, make in steps:
            took, worst, status = await during(poller, make())
            assert status < 300, (name, status)
            print(f"{name:<10} {took:>8.2f} {worst * 1000:>19.1f} {worst / idle:>8.1f}")
            if name == "run":
                runs = (await client.get("/background/tasks/big/runs")).json()
                run_id = runs[0]["id"]
        await asyncio.sleep(0.5)
        took, worst, status = await during(poller, client.post(f"/background/runs/{run_id}/cancel"))
        print(f"{'cancel':<10} {took:>8.2f} {worst * 1000:>19.1f} {worst / idle:>8.1f}")
    server.should_exit = True
    await serving


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--database-url", help="default: a new SQLite file")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.users, arguments.database_url))
