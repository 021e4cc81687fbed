"""Executor throughput against the test model server.

Runs a task for N users (default 2,000) with every model call taking LATENCY seconds (default
0.2) and 2 model calls per user, `batch_size` 50, on a SQLite file, and prints the achieved
throughput as a ratio of the ideal: users x calls x latency / batch_size.

    uv run python bench/executor.py [users] [latency] [batch_size]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AGNO_TELEMETRY", "false")

from ralph.background.models import CronTrigger, TaskDefinition, TriggerType
from ralph.config import Settings
from ralph.logs import configure_logging
from ralph.services import open_services
from ralph.testing.model_server import Delay, ModelServer, call, scripted, text


async def main(users: int, latency: float, batch_size: int) -> None:
    configure_logging("warning", json=True)
    responder = scripted(Delay(latency, call("list_memory_blocks")), Delay(latency, text("ok")))
    with tempfile.TemporaryDirectory() as tmp, ModelServer(responder) as server:
        settings = Settings(
            data_dir=Path(tmp),
            model_provider="openai",
            model_base_url=server.base_url,
            model_id="bench",
            model_max_retries=0,
            _env_file=None,  # type: ignore[call-arg]
        )
        async with open_services(settings) as services:
            task = TaskDefinition(
                name="bench",
                system_prompt="bench",
                tools=["list_memory_blocks"],
                trigger=CronTrigger(schedule="0 3 * * *"),
                user_ids=[f"user-{i}" for i in range(users)],
                batch_size=batch_size,
                max_turns=5,
            )
            await services.registry.create(task)
            started = time.perf_counter()
            run = await services.executor.execute_task(task, TriggerType.MANUAL)
            elapsed = time.perf_counter() - started
    ideal = users * 2 * latency / batch_size
    print(f"users={users} latency={latency}s calls/user=2 batch_size={batch_size}")
    print(f"status={run.status.value} counts={run.counts} model_calls={server.calls}")
    print(f"peak concurrent model requests={server.max_in_flight}")
    print(f"elapsed={elapsed:.2f}s ideal={ideal:.2f}s throughput/ideal={ideal / elapsed:.3f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            int(args[0]) if args else 2000,
            float(args[1]) if len(args) > 1 else 0.2,
            int(args[2]) if len(args) > 2 else 50,
        )
    )
