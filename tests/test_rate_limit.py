"""One rate limit for every model call: smooth (never a minute's worth at once), shared by
worker processes through Redis, slowed by 429s, and not counted against a user's timeout.

Real time: the limits are per second and per minute.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.agents.ratelimit import ModelRateLimiter
from ralph.agents.wire import turn_of
from ralph.config import Settings
from ralph.db import migrate
from ralph.db.engine import create_engine
from ralph.testing.model_server import Action, Fail, ModelServer, call, text
from ralph.testing.processes import model_server_process, server_stats, start_worker_process
from tests.helpers import create_mariadb_database, drop_mariadb_database, serving
from tests.test_worker import REDIS_URL, delete_queue_keys, require_redis

pytestmark = pytest.mark.slow


class FirstAttemptRejected:
    """A provider under a burst: half the requests are a 429 without Retry-After, namely the
    first attempt of every call (its retry is answered)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> Action:
        call_key = json.dumps(request["messages"], sort_keys=True)
        with self._lock:
            first = call_key not in self._seen
            self._seen.add(call_key)
        if first:
            return Fail(429, "slow down")
        return call("list_memory_blocks") if turn_of(request) == 0 else text("done")


def most_starts_within(starts: list[float], seconds: float) -> int:
    """The most calls that started within any `seconds`."""
    ordered = sorted(starts)
    return max(sum(1 for t in ordered if s <= t < s + seconds) for s in ordered)


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
async def test_the_limit_is_smooth(shared: bool) -> None:
    """1,200 a minute is 20 a second: 60 calls take about 3 s, never 21 in one second, and
    spread within the second (5 a quarter second; a loop that lags may bunch a few: at most
    half a second's worth), not released together when a window opens."""
    if shared:
        await require_redis()
    limiter = ModelRateLimiter(
        requests_per_minute=1200,
        redis_url=REDIS_URL if shared else None,
        namespace=f"ralph-test-{uuid.uuid4().hex[:8]}",
    )
    # the garbage of earlier tests collected now, not in a pause of 0.1 s or more between a
    # call's window stamp and its start (the margin is 0.1 s)
    gc.collect()
    began = time.monotonic()
    starts: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        starts.append(time.monotonic() - began)

    await asyncio.gather(*(one() for _ in range(60)))
    assert most_starts_within(starts, 1.0) <= 20
    assert most_starts_within(starts, 0.25) <= 10
    assert 2.0 <= max(starts) < 4.0


async def test_a_foreground_call_does_not_queue_behind_background_calls() -> None:
    """60 a minute: five background calls reserve the next five seconds; a chat call made
    just after them waits only for the second's window, not behind them."""
    limiter = ModelRateLimiter(requests_per_minute=60)
    background = [asyncio.create_task(limiter.acquire()) for _ in range(5)]
    await asyncio.sleep(0.1)
    chat = await limiter.acquire(foreground=True)
    waits = await asyncio.gather(*background)
    assert chat < 1.5
    assert max(waits) > 3.5


async def test_cancelled_callers_give_their_turns_back() -> None:
    """60 a minute: six callers at once, five of them queued up to 5 s ahead, are cancelled
    (their run was): the next caller waits for the second's window, not for their turns."""
    limiter = ModelRateLimiter(requests_per_minute=60)
    queued = [asyncio.create_task(limiter.acquire()) for _ in range(6)]
    await asyncio.sleep(0.1)
    assert queued[0].done()
    for caller in queued[1:]:
        caller.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    waited = await limiter.acquire()
    assert 0.5 < waited < 1.5


def sqlite_settings(tmp_path: Path, server: ModelServer | str, **extra: Any) -> Settings:
    """Settings on a SQLite file for the scripted `server` (or the model server at a URL)."""
    # the limiter and the calls in the test's process, unless the test says otherwise
    extra = {"worker_mode": "inprocess", **extra}
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'ralph.db'}",
        data_dir=tmp_path / "data",
        scheduler_enabled=False,
        model_provider="openai",
        model_base_url=server if isinstance(server, str) else server.base_url,
        model_id="scripted",
        model_max_retries=3,
        wait_max_seconds=120.0,
        _env_file=None,  # type: ignore[call-arg]
        **extra,
    )


def done(_: dict[str, Any]) -> Action:
    return text("done")


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer(done) as server:
        yield server


async def run_task(
    client: AsyncClient,
    users: int,
    batch_size: int,
    timeout_seconds: float,
    tools: list[str],
    name: str = "limited",
) -> dict[str, Any]:
    """Create a task of `users` users and run it to the end; the finished run."""
    task = {
        "name": name,
        "system_prompt": "review",
        "tools": tools,
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": [f"user-{i:03d}" for i in range(users)],
        "batch_size": batch_size,
        "timeout_seconds": timeout_seconds,
    }
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    run: dict[str, Any] = (await client.post(f"/background/tasks/{name}/run?wait=true")).json()
    return run


async def run_hundred_users(client: AsyncClient) -> dict[str, Any]:
    return await run_task(client, 100, 20, 20, ["list_memory_blocks"])


async def test_a_configured_limit_keeps_the_provider_from_429(tmp_path: Path) -> None:
    """The provider allows 10 a second; 480 a minute is 8 a second: 200 calls, no 429, and
    each user's wait for the limit is recorded. The provider runs in its own process: in this
    one it would stamp arrivals when the GIL let it, not when they arrived. (At 9 a second a
    busy machine drew a few 429s: calls taken 20 ms apart at the limiter arrived bunched.)"""
    steps = ("tool:list_memory_blocks", "done")
    with model_server_process(0.0, 0.0, *steps, per_second=10) as provider_url:
        settings = sqlite_settings(tmp_path, provider_url, model_requests_per_minute=480)
        async with serving(settings) as client:
            run = await run_hundred_users(client)
            assert run["counts"] == {"success": 100}
            waits = [u["rate_limit_wait_seconds"] for u in await _all_users(client, run["id"])]
        stats = server_stats(provider_url)
    assert stats["failures"] == {}  # no 429
    assert stats["calls"] == 200
    # 20 agents in flight share 8 calls a second: each waited, about 2 s a call
    assert min(waits) >= 0
    assert sum(waits) / len(waits) > 1.0


async def test_chat_and_the_agent_process_share_the_servers_limit(tmp_path: Path) -> None:
    """The default mode runs agents in a child process: its calls and the server's chat wait
    on one limit. 60 a minute are configured: a run of 4 users (8 calls) and 3 chat messages
    during it reach the provider at least 0.75 s apart (1.05 s by the limit, less any pause
    of a process between its turn and its send). Each process with a limit of its own, two
    streams of one a second each cannot all be 0.75 s apart (measured: 0.48 s, and a provider
    allowing 1 a second answered 429 three times). The agents' waits reach their results."""
    steps = ("tool:list_memory_blocks", "done")
    with model_server_process(0.0, 0.0, *steps) as provider_url:
        settings = sqlite_settings(
            tmp_path, provider_url, model_requests_per_minute=60, worker_mode="subprocess"
        )
        async with serving(settings) as client:

            async def chat() -> list[str]:
                await asyncio.sleep(1.0)
                answers: list[str] = []
                for i in range(3):
                    reply = await client.post(
                        "/chat/stream", json={"user_id": "chatty", "message": f"hi {i}"}
                    )
                    answers.append(reply.text)
                return answers

            run, answers = await asyncio.gather(
                run_task(client, 4, 4, 60, ["list_memory_blocks"]), chat()
            )
            assert run["counts"] == {"success": 4}
            assert all('"type": "done"' in a or '"type":"done"' in a for a in answers), answers
            waits = [u["rate_limit_wait_seconds"] for u in await _all_users(client, run["id"])]
        stats = server_stats(provider_url)
    assert stats["calls"] == 4 * 2 + 3 * 2
    arrivals = sorted(stats["arrivals"])
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert min(gaps) > 0.75, gaps
    assert sum(waits) > 3.0  # 8 calls at one a second, 4 agents at once


async def test_waiting_for_the_limit_is_not_part_of_the_timeout(
    tmp_path: Path, model_server: ModelServer
) -> None:
    """One call a second for 5 agents started at once with a 2 s timeout: the last waits about
    4 s for its turn, and still succeeds."""
    model_server.responder = done
    async with serving(
        sqlite_settings(tmp_path, model_server, model_requests_per_minute=60)
    ) as client:
        run = await run_task(client, 5, 5, 2, [])
        assert run["counts"] == {"success": 5}
        waits = sorted(u["rate_limit_wait_seconds"] for u in await _all_users(client, run["id"]))
    assert waits[0] < 0.5
    assert waits[-1] > 3.0


async def _all_users(client: AsyncClient, run_id: str) -> list[dict[str, Any]]:
    detail = (await client.get(f"/background/runs/{run_id}?users_limit=1000")).json()
    users: list[dict[str, Any]] = detail["user_results"]
    return users


async def test_two_workers_share_the_limit_through_redis(
    tmp_path: Path, model_server: ModelServer
) -> None:
    """On MariaDB, as the worker mode is meant to run (three processes writing one SQLite file
    wait on each other's locks), the provider allowing 10 requests a second. The provider runs
    in a process of its own: in this one it would share the GIL with the coordinating server
    and see arrivals late, in bunches. A short run first warms the workers up (their first
    agent imports half of Agno between taking a slot and sending), then the measured run.
    480 a minute (8 a second): at 9, one CI run in several drew two 429s (a second's calls
    leave together and the provider takes them one after another); without the shared limit
    the two workers would send up to 16 a second."""
    await require_redis()
    database_url = await create_mariadb_database()
    engine = create_engine(database_url)
    await migrate.upgrade(engine)
    await engine.dispose()
    steps = ("tool:list_memory_blocks", "done")
    with model_server_process(0.0, 0.0, *steps, per_second=10) as provider_url:
        settings = sqlite_settings(
            tmp_path,
            model_server,
            model_requests_per_minute=480,
            worker_mode="arq",
            redis_url=REDIS_URL,
            queue_name=f"ralph-test-{uuid.uuid4().hex[:10]}",
        ).model_copy(update={"database_url": database_url, "model_base_url": provider_url})
        workers = [await start_worker_process(settings) for _ in range(2)]
        try:
            async with serving(settings) as client:
                warm = await run_task(client, 4, 4, 20, ["list_memory_blocks"], name="warm-up")
                assert warm["counts"] == {"success": 4}
                before = server_stats(provider_url)
                run = await run_hundred_users(client)
                assert run["counts"] == {"success": 100}
        finally:
            for worker in workers:
                worker.terminate()
                await worker.wait()
            await delete_queue_keys(settings.queue_name)
            await drop_mariadb_database(database_url)
        stats = server_stats(provider_url)
    assert stats["failures"] == before["failures"]  # no 429 in the measured run
    assert stats["calls"] - before["calls"] == 200


async def test_a_burst_of_429s_without_a_limit(
    tmp_path: Path, model_server: ModelServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """No limit configured, the provider rejects half the requests: 429s pause every agent,
    every user succeeds within the retry bound, and fewer than 3 requests are spent per call
    that got an answer."""
    model_server.responder = FirstAttemptRejected()
    async with serving(sqlite_settings(tmp_path, model_server)) as client:
        for i in range(20):  # each user's instructions (and so each call) differ
            await client.put(f"/users/user-{i:03d}/blocks/student", json={"body": f"user {i}"})
        run = await run_task(client, 20, 10, 60, ["list_memory_blocks"])
    assert run["counts"] == {"success": 20}
    answered = 40  # 2 calls per user
    with capsys.disabled():
        print(f"\n429 burst: {model_server.calls} requests for {answered} answered calls")
    assert model_server.calls == 2 * answered  # each call's first attempt was refused
    assert model_server.calls < 3 * answered
