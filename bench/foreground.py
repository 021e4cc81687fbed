"""Foreground latency while background agents saturate the server.

A real `ralph serve` (its own process, SQLite, the embedded defaults) and the scripted model
server (another process, LATENCY s per call). A client in this process reads one user's memory
(`GET /users/{id}/blocks`, 5 blocks) every 10 ms, sequentially: first with the executor idle,
then while a task of USERS users (`batch_size` 50, 2 model calls per user) runs. Prints p50,
p99 and max of both phases and their ratio, from the same run.

    python bench/foreground.py [--users 2000] [--latency 0.2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("AGNO_TELEMETRY", "false")

from _server import model_server_process
from ralph.testing.processes import free_port, start_server_process

USER = "reader"


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def sample(client: httpx.AsyncClient, seconds: float) -> list[float]:
    """Latencies (s) of GET /users/{USER}/blocks, one at a time, every 10 ms for `seconds`."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        answer = await client.get(f"/users/{USER}/blocks")
        latencies.append(time.perf_counter() - started)
        assert answer.status_code == 200, answer.text
        await asyncio.sleep(0.01)
    return latencies


def describe(name: str, latencies: list[float]) -> str:
    return (
        f"{name:<10} n={len(latencies):>5} p50={statistics.median(latencies) * 1000:7.1f} ms "
        f"p99={percentile(latencies, 0.99) * 1000:7.1f} ms max={max(latencies) * 1000:7.1f} ms"
    )


async def measure(base_url: str, users: int, seconds: float, extra_env: dict[str, str]) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "RALPH_DATA_DIR": tmp,
            "RALPH_MODEL_PROVIDER": "openai",
            "RALPH_MODEL_BASE_URL": base_url,
            "RALPH_MODEL_ID": "bench",
            "RALPH_MODEL_MAX_RETRIES": "0",
            "RALPH_LOG_LEVEL": "warning",
            **extra_env,
        }
        server = await asyncio.to_thread(start_server_process, port, env)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                for i in range(5):
                    answer = await client.put(
                        f"/users/{USER}/blocks/block-{i}", json={"body": f"fact {i} " * 40}
                    )
                    assert answer.status_code < 300, answer.text
                task = {
                    "name": "saturate",
                    "system_prompt": "review",
                    "tools": ["list_memory_blocks"],
                    "trigger": {"type": "cron", "schedule": "0 3 * * *"},
                    "user_ids": [f"user-{i}" for i in range(users)],
                    "batch_size": 50,
                    "max_turns": 5,
                }
                answer = await client.post("/background/tasks", json=task)
                assert answer.status_code == 201, answer.text
                await sample(client, 1.0)  # warm up
                idle = await sample(client, seconds)
                answer = await client.post("/background/tasks/saturate/run")
                assert answer.status_code == 202, answer.text
                run_id = answer.json()["run_id"]
                await asyncio.sleep(1.0)  # the window fills
                busy = await sample(client, seconds)
                run = (await client.get(f"/background/runs/{run_id}?users_limit=0")).json()
                finished = sum(n for status, n in run["counts"].items() if status != "pending")
                await client.post(f"/background/runs/{run_id}/cancel")
        finally:
            server.terminate()
            await asyncio.to_thread(server.wait, 30)
    print(describe("idle", idle))
    print(describe("saturated", busy))
    print(f"users started or done during the saturated phase: {finished} of {users}")
    idle_p99 = percentile(idle, 0.99)
    busy_p99 = percentile(busy, 0.99)
    print(f"p99 saturated / idle: {busy_p99 / idle_p99:.2f}x (target <= 5x and < 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)"
    )
    arguments = parser.parse_args()
    extra = dict(item.split("=", 1) for item in arguments.env)
    steps = ("tool:list_memory_blocks", "ok")
    with model_server_process(arguments.latency, 0.0, *steps) as url:
        asyncio.run(measure(url, arguments.users, arguments.seconds, extra))


if __name__ == "__main__":
    main()
