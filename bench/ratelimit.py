"""The model rate limiter: its cost per call, and how close a run gets to the configured rate.

Overhead: 5,000 calls that never have to wait (a limit far above them), against a limiter with
no limit configured, same run; in process and through Redis (the worker mode). Rate: 50
callers at once against 1,200 requests a minute (20 a second) for 300 calls; achieved rate
(first start to last) divided by the configured one (target >= 0.9), and the most calls that
started within any 100 ms (2 a tenth of a second is smooth; 20 is a second's calls at once).

    python bench/ratelimit.py [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from ralph.agents.ratelimit import ModelRateLimiter


async def per_call(limiter: ModelRateLimiter, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await limiter.acquire(100)
    return (time.perf_counter() - started) / calls


async def achieved(limiter: ModelRateLimiter, calls: int, callers: int) -> tuple[float, int]:
    """(calls per minute from the first start to the last, the most starts in any 100 ms)."""
    queue = list(range(calls))
    starts: list[float] = []

    async def caller() -> None:
        while queue:
            queue.pop()
            await limiter.acquire(100)
            starts.append(time.perf_counter())

    await asyncio.gather(*(caller() for _ in range(callers)))
    starts.sort()
    bunch = max(sum(1 for t in starts[i:] if t < s + 0.1) for i, s in enumerate(starts))
    return (calls - 1) / (starts[-1] - starts[0]) * 60, bunch


async def main(redis_url: str | None) -> None:
    stores: list[tuple[str, str | None]] = [("in process", None)]
    if redis_url:
        stores.append(("redis", redis_url))
    print(
        f"{'store':<11} {'no limit us/call':>17} {'limited us/call':>16} {'rate achieved':>14}"
        f" {'most in 100 ms':>15}"
    )
    for name, url in stores:

        def make(
            rpm: int | None, tpm: int | None = None, url: str | None = url
        ) -> ModelRateLimiter:
            return ModelRateLimiter(
                requests_per_minute=rpm,
                tokens_per_minute=tpm,
                redis_url=url,
                namespace=f"bench-{uuid.uuid4().hex[:8]}",
            )

        calls = 5000 if url is None else 1000
        bare = await per_call(make(None), calls)
        limited = await per_call(make(10**9, 10**12), calls)
        rpm = 1200
        rate, bunch = await achieved(make(rpm), 300, 50)
        print(
            f"{name:<11} {bare * 1e6:>17.1f} {limited * 1e6:>16.1f} {rate / rpm:>13.3f}x"
            f" {bunch:>15}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.redis or None))
