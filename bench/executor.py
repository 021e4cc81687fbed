"""Executor throughput against the scripted model server (run in its own process).

1. N users (default 2,000), 2 model calls per user, every call LATENCY s (default 0.2),
   `batch_size` 50: achieved throughput as a ratio of the ideal users x calls x latency /
   batch_size.
2. Heavy-tailed (lognormal) latency with the same median: the sliding window's throughput as
   a ratio of the original plan's batch-by-batch scheme (each batch waits for its slowest user).

    uv run python bench/executor.py [users] [latency] [batch_size] [sigma] [workers]

The fixed-latency case runs with the agents in this process (`inprocess`) and in an agent
process (`subprocess`, `ralph serve`'s default). With `workers` > 0 (Redis needed), it is
measured again with the agents run by that many `ralph worker` processes
(RALPH_WORKER_MODE=arq).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvloop

os.environ.setdefault("AGNO_TELEMETRY", "false")
sys.path.insert(0, str(Path(__file__).parent))


from _server import model_server_process, server_stats
from ralph.background.models import CronTrigger, TaskDefinition, TaskRun, TriggerType
from ralph.composition import Services, open_services
from ralph.config import Settings, WorkerMode
from ralph.errors import Conflict
from ralph.logs import configure_logging
from ralph.testing.processes import start_worker_process


def settings_for(base_url: str, data_dir: Path, worker_mode: WorkerMode = "inprocess") -> Settings:
    """Settings for the benchmark; `worker_mode` "inprocess" or "subprocess" (where agents
    run: the event loop that measures, or the agent process)."""
    # RALPH_BENCH_DATABASE_URL runs the benchmark on another database (e.g. MariaDB; the
    # database must exist and be empty); the default is a fresh SQLite file.
    return Settings(
        data_dir=data_dir,
        database_url=os.environ.get("RALPH_BENCH_DATABASE_URL") or None,
        model_provider="openai",
        model_base_url=base_url,
        model_id="bench",
        model_max_retries=0,
        worker_mode=worker_mode,
        _env_file=None,  # type: ignore[call-arg]
    )


def task_for(users: int, batch_size: int) -> TaskDefinition:
    return TaskDefinition(
        name="bench",
        system_prompt="bench",
        tools=["list_memory_blocks"],
        trigger=CronTrigger(schedule="0 3 * * *"),
        user_ids=[f"user-{i}" for i in range(users)],
        batch_size=batch_size,
        max_turns=5,
    )


async def put_task(services: Services, task: TaskDefinition) -> None:
    """Create the task, or replace it (RALPH_BENCH_DATABASE_URL's database keeps it from the
    previous measurement)."""
    try:
        await services.registry.create(task)
    except Conflict:
        await services.registry.replace(task)


async def execute_task(services: Services, task: TaskDefinition) -> TaskRun:
    run_id = await services.background.create_run(task, TriggerType.MANUAL)
    return await services.coordinator.execute(run_id)


async def sliding(services: Services, task: TaskDefinition) -> float:
    started = time.perf_counter()
    run = await execute_task(services, task)
    assert run.counts == {"success": len(task.user_ids)}, run.counts
    return time.perf_counter() - started


async def batch_by_batch(services: Services, task: TaskDefinition) -> float:
    """The original plan's scheme: gather one batch, then start the next."""
    run_id = await services.background.create_run(task, TriggerType.MANUAL)
    await services.runs.mark_started(run_id, services.coordinator.owner, services.clock.now())
    started = time.perf_counter()
    users = task.user_ids
    for i in range(0, len(users), task.batch_size):
        await asyncio.gather(
            *[services.units.run_user(run_id, task, u) for u in users[i : i + task.batch_size]]
        )
    return time.perf_counter() - started


async def measure_with_workers(
    base_url: str, users: int, batch_size: int, workers: int, data_dir: Path
) -> float:
    """The sliding window in this process, agents in `workers` `ralph worker` processes."""
    settings = settings_for(base_url, data_dir).model_copy(
        update={"worker_mode": "arq", "queue_name": f"ralph-bench-{os.getpid()}"}
    )
    async with open_services(settings) as services:
        task = task_for(users, batch_size)
        await put_task(services, task)
        processes = [await start_worker_process(settings) for _ in range(workers)]
        try:
            await asyncio.sleep(3)  # let the workers connect
            started = time.perf_counter()
            run = await execute_task(services, task)
            assert run.counts == {"success": users}, run.counts
            return time.perf_counter() - started
        finally:
            for process in processes:
                process.terminate()
                await process.wait()


async def measure(
    base_url: str, users: int, batch_size: int, scheme: str, worker_mode: WorkerMode = "inprocess"
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(base_url, Path(tmp), worker_mode)
        async with open_services(settings) as services:
            if worker_mode == "subprocess":
                await asyncio.sleep(5)  # the agent process starts with the services
            task = task_for(users, batch_size)
            await put_task(services, task)
            if scheme == "sliding":
                return await sliding(services, task)
            return await batch_by_batch(services, task)


def run(coroutine: Coroutine[Any, Any, float]) -> float:
    """Run on uvloop, as `ralph serve` does (uvicorn picks it when installed)."""
    return uvloop.run(coroutine)


def main(users: int, latency: float, batch_size: int, sigma: float, workers: int) -> None:
    configure_logging("warning", json=True)
    steps = ("tool:list_memory_blocks", "ok")
    ideal = users * 2 * latency / batch_size
    print(f"fixed latency: users={users} latency={latency}s calls/user=2 batch_size={batch_size}")
    modes: tuple[WorkerMode, ...] = ("inprocess", "subprocess")
    for mode in modes:
        with model_server_process(latency, 0.0, *steps) as url:
            elapsed = run(measure(url, users, batch_size, "sliding", mode))
            stats = server_stats(url)
        print(
            f"  RALPH_WORKER_MODE={mode}: model calls={stats['calls']} "
            f"peak in flight={stats['max_in_flight']} connections opened={stats['connections']}"
        )
        print(
            f"    elapsed={elapsed:.2f}s ideal={ideal:.2f}s throughput/ideal={ideal / elapsed:.3f}"
        )
    if workers:
        with (
            model_server_process(latency, 0.0, *steps) as url,
            tempfile.TemporaryDirectory() as tmp,
        ):
            elapsed = run(measure_with_workers(url, users, batch_size, workers, Path(tmp)))
        print(
            f"  with {workers} ralph worker processes (RALPH_WORKER_MODE=arq): "
            f"elapsed={elapsed:.2f}s throughput/ideal={ideal / elapsed:.3f}"
        )

    times: dict[str, float] = {}
    for scheme in ("sliding", "batch-by-batch"):
        with model_server_process(latency, sigma, *steps) as url:
            times[scheme] = run(measure(url, users, batch_size, scheme))
    print(f"lognormal latency (median {latency}s, sigma {sigma}):")
    for scheme, seconds in times.items():
        print(f"  {scheme}: {seconds:.2f}s")
    print(
        f"  sliding window speed-up over batch-by-batch: "
        f"{times['batch-by-batch'] / times['sliding']:.2f}x"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        int(args[0]) if args else 2000,
        float(args[1]) if len(args) > 1 else 0.2,
        int(args[2]) if len(args) > 2 else 50,
        float(args[3]) if len(args) > 3 else 1.0,
        int(args[4]) if len(args) > 4 else 0,
    )
