"""CPU per model request on each HTTP client, the scripted model server in its own process.

N posts (default 4,000) of a chat-completions request with 50 in flight and 50 ms of server
latency: httpx with its default pool (20 connections kept alive), httpx with a pool as large as
the window, and aiohttp (what `DirectOpenAI` posts on, `ralph.agents.transport`).

    uv run python bench/transport.py [requests]
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from _server import model_server_process

IN_FLIGHT = 50
BODY = {"model": "bench", "messages": [{"role": "user", "content": "hello " * 200}]}


async def in_window(count: int, post: Callable[[], Awaitable[None]]) -> None:
    window = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with window:
            await post()

    await asyncio.gather(*(one() for _ in range(count)))


async def with_httpx(url: str, count: int, keep_alive: int | None) -> None:
    # httpx's default pool: 100 connections, 20 of them kept alive
    limits = httpx.Limits(
        max_connections=100 if keep_alive is None else 1000,
        max_keepalive_connections=keep_alive or 20,
    )
    async with httpx.AsyncClient(limits=limits) as client:

        async def post() -> None:
            (await client.post(url, json=BODY)).json()

        await in_window(count, post)


async def with_aiohttp(url: str, count: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:

        async def post() -> None:
            async with session.post(url, json=BODY) as response:
                await response.json()

        await in_window(count, post)


def main(count: int) -> None:
    with model_server_process(0.05, 0.0, "ok") as base:
        url = f"{base}/chat/completions"
        cases: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "httpx, default pool": lambda: with_httpx(url, count, None),
            f"httpx, {IN_FLIGHT + 14} kept alive": lambda: with_httpx(url, count, IN_FLIGHT + 14),
            "aiohttp": lambda: with_aiohttp(url, count),
        }
        print(f"{count} posts, {IN_FLIGHT} in flight, 50 ms server latency")
        for name, case in cases.items():
            cpu, wall = time.process_time(), time.perf_counter()
            uvloop.run(case())
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"  {name:<24} {cpu / count * 1000:.2f} ms CPU per request, {wall:.1f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000)
