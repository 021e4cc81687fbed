"""Peak memory of a large run: the executor must not hold one coroutine (or row) per user.

Creates a task and a run for N users (default 100,000), lets the sliding window process the
first 2,000 users against the scripted model server (own process, no latency), cancels the
rest, and prints the process's peak resident memory, next to the same for 1,000 users.

    uv run python bench/peak_memory.py [users]
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("AGNO_TELEMETRY", "false")
sys.path.insert(0, str(Path(__file__).parent))

from _server import model_server_process
from ralph.background.models import CronTrigger, TaskDefinition, TriggerType
from ralph.composition import open_services
from ralph.config import Settings
from ralph.logs import configure_logging

PROCESSED = 2_000


async def run(users: int, url: str, data_dir: Path) -> dict[str, int]:
    settings = Settings(
        data_dir=data_dir,
        model_provider="openai",
        model_base_url=url,
        model_id="bench",
        model_max_retries=0,
        worker_mode="inprocess",  # the peak memory of a run with its agents in this process
        _env_file=None,  # type: ignore[call-arg]
    )
    async with open_services(settings) as services:
        task = TaskDefinition(
            name="memory-bench",
            system_prompt="bench",
            tools=["list_memory_blocks"],
            trigger=CronTrigger(schedule="0 3 * * *"),
            user_ids=[f"user-{i:06d}" for i in range(users)],
            batch_size=50,
        )
        await services.registry.create(task)
        run_id = await services.background.create_run(task, TriggerType.MANUAL)
        job = services.coordinator.start(run_id)
        while True:
            await asyncio.sleep(0.5)
            counts = await services.runs.counts(run_id)
            if counts.get("success", 0) >= min(PROCESSED, users) or job.done():
                break
        if not job.done():
            await services.coordinator.cancel(run_id)
        final = await job
        return final.counts


def main(users: int) -> None:
    configure_logging("warning", json=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        model_server_process(0.0, 0.0, "tool:list_memory_blocks", "ok") as url,
    ):
        counts = asyncio.run(run(users, url, Path(tmp)))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"users={users:,} processed then cancelled: {counts}; peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
