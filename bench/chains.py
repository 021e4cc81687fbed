"""Task chains at scale: N users (default 10,000) through task A, and task B following A per
user (`after` trigger, no delay), against the scripted model server (one call per user,
LATENCY s each, default 0.2; `batch_size` 100 for both), the scheduler's loop running on
the real clock.

    uv run python bench/chains.py [users] [latency] [worker_mode]

`worker_mode`: where the agents run, `subprocess` (the default, `ralph serve`'s: the
scheduler's loop is not the agents') or `inprocess`.

Prints how many runs of B the users' A results made, B's start lag for each user (its B
unit's start minus its A unit's end: p50, p99, max), and the time from A's start to the last
B result as a ratio of A's own time, next to the ratio for B started only when A's whole run
is done (the same B run measured alone, in the same process).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import uvloop
from sqlalchemy import func, select

os.environ.setdefault("AGNO_TELEMETRY", "false")
sys.path.insert(0, str(Path(__file__).parent))

from _server import model_server_process
from executor import settings_for
from ralph.background.models import AfterTrigger, CronTrigger, TaskDefinition, TriggerType
from ralph.composition import Services, open_services
from ralph.config import WorkerMode
from ralph.db.tables import task_run_users, task_runs
from ralph.logs import configure_logging


def task(name: str, users: list[str], follows: str | None = None) -> TaskDefinition:
    trigger = AfterTrigger(task=follows) if follows else CronTrigger(schedule="0 3 1 1 *")
    return TaskDefinition(
        name=name,
        system_prompt=name,
        tools=[],
        trigger=trigger,
        user_ids=users,
        batch_size=100,
    )


async def ends(services: Services, task_name: str, column: str) -> dict[str, datetime]:
    """Each user's unit end (`completed_at`) or start (`started_at`) over the task's runs."""
    at = task_run_users.c[column]
    query = (
        select(task_run_users.c.user_id, func.max(at))
        .join(task_runs, task_runs.c.id == task_run_users.c.run_id)
        .where(task_runs.c.task_name == task_name)
        .group_by(task_run_users.c.user_id)
    )
    async with services.engine.connect() as conn:
        return {str(user): when for user, when in (await conn.execute(query)).all()}


async def claimed_at(services: Services) -> dict[str, datetime]:
    """When each user's run of B was created (the scheduler claimed their A result)."""
    query = (
        select(task_run_users.c.user_id, task_runs.c.created_at)
        .join(task_runs, task_runs.c.id == task_run_users.c.run_id)
        .where(task_runs.c.task_name == "b")
    )
    async with services.engine.connect() as conn:
        return {str(user): when for user, when in (await conn.execute(query)).all()}


async def b_done(services: Services, users: int) -> int:
    query = (
        select(func.count())
        .select_from(task_run_users)
        .join(task_runs, task_runs.c.id == task_run_users.c.run_id)
        .where(task_runs.c.task_name == "b", task_run_users.c.status == "success")
    )
    async with services.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def measure(base_url: str, users: int, mode: WorkerMode) -> None:
    ids = [f"user-{i}" for i in range(users)]
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(base_url, Path(tmp), mode)
        async with open_services(settings) as services:
            if mode == "subprocess":
                await asyncio.sleep(5)  # the agent process starts with the services
            a = task("a", ids)
            await services.registry.create(a)
            # B alone, as it would run after A's whole run: the baseline of the same process
            alone = task("alone", ids)
            await services.registry.create(alone)
            started = time.perf_counter()
            run_id = await services.background.create_run(alone, TriggerType.MANUAL)
            await services.coordinator.execute(run_id)
            b_alone = time.perf_counter() - started

            await services.registry.create(task("b", ids, follows="a"))
            services.scheduler.start()
            try:
                started = time.perf_counter()
                run_id = await services.background.create_run(a, TriggerType.MANUAL)
                await services.coordinator.execute(run_id)
                a_elapsed = time.perf_counter() - started
                while await b_done(services, users) < users:  # noqa: ASYNC110 (polls the database)
                    await asyncio.sleep(0.2)
                chain_elapsed = time.perf_counter() - started
            finally:
                await services.scheduler.stop()
                await services.coordinator.drain()
            a_ends = await ends(services, "a", "completed_at")
            b_starts = await ends(services, "b", "started_at")
            b_claims = await claimed_at(services)
            lags = sorted((b_starts[u] - a_ends[u]).total_seconds() for u in ids)
            claims = sorted((b_claims[u] - a_ends[u]).total_seconds() for u in ids)
            b_runs = len(await services.background.runs("b", None, 10_000))
    print(f"users={users}: runs of B={b_runs} (users per run {users / b_runs:.0f})")
    for what, found in (("B's run created", claims), ("B's unit started", lags)):
        quantiles = statistics.quantiles(found, n=100)
        print(
            f"  {what}, after the user's A result: p50={quantiles[49]:.2f}s "
            f"p99={quantiles[98]:.2f}s max={found[-1]:.2f}s"
        )
    print(
        f"  A alone {a_elapsed:.2f}s; A then B per user {chain_elapsed:.2f}s "
        f"= {chain_elapsed / a_elapsed:.2f}x A; B after A's whole run would be "
        f"{(a_elapsed + b_alone) / a_elapsed:.2f}x A (B alone {b_alone:.2f}s, same process)"
    )


def main(users: int, latency: float, mode: WorkerMode) -> None:
    configure_logging("warning", json=True)
    print(f"latency={latency}s RALPH_WORKER_MODE={mode}")
    with model_server_process(latency, 0.0, "ok") as url:
        uvloop.run(measure(url, users, mode))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        int(args[0]) if args else 10_000,
        float(args[1]) if len(args) > 1 else 0.2,
        "inprocess" if len(args) > 2 and args[2] == "inprocess" else "subprocess",
    )
