"""CPU cost of one agent run (model calls, one tool call, bookkeeping), in milliseconds.

Each run: 3 model calls (list blocks, propose an edit, answer), as the dev model scripts it.
Measured twice: with the in-process `dev` model (no network), and over HTTP to the scripted
model server running in its own process (so its CPU is not counted).

    uv run python bench/agents.py [runs]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AGNO_TELEMETRY", "false")
sys.path.insert(0, str(Path(__file__).parent))

from _server import model_server_process
from ralph.agents.runner import run_agent
from ralph.agents.tools import ToolContext
from ralph.composition import open_services
from ralph.config import Settings
from ralph.logs import configure_logging

TOOLS = ("list_memory_blocks", "edit_memory_block")


async def measure(settings: Settings, runs: int) -> tuple[float, float, int]:
    # agents run here, by this function: no agent process
    settings = settings.model_copy(update={"worker_mode": "inprocess"})
    async with open_services(settings) as services:
        await services.memory.put_block("u1", "student", title="S", body="Ann", author="api")

        async def one(i: int) -> int:
            outcome = await run_agent(
                model=services.models(),
                tools=TOOLS,
                context=ToolContext(
                    "u1",
                    services.memory,
                    services.conversations,
                    settings.data_dir,
                    author="agent:bench",
                    run_id=f"run-{i}",
                ),
                instructions="review the user",
                prompt="go",
                max_turns=5,
                timeout_seconds=30,
            )
            assert outcome.error is None, outcome.error
            return outcome.turns_used

        await one(-1)  # warm-up: imports, connection pool
        cpu, wall = time.process_time(), time.perf_counter()
        turns = 0
        for i in range(runs):
            turns = await one(i)
        return (
            (time.process_time() - cpu) / runs * 1000,
            (time.perf_counter() - wall) / runs * 1000,
            turns,
        )


async def main(runs: int) -> None:
    configure_logging("warning", json=True)
    with tempfile.TemporaryDirectory() as tmp:
        dev = Settings(data_dir=Path(tmp) / "dev", model_provider="dev", _env_file=None)  # type: ignore[call-arg]
        cpu, wall, turns = await measure(dev, runs)
        print(
            f"in-process dev model: {cpu:.2f} ms CPU, {wall:.2f} ms wall per run "
            f"({turns} model calls, {runs} runs)"
        )
        edit = '{"label": "last_reviewed", "body": "reviewed", "reason": "bench"}'
        steps = ("tool:list_memory_blocks", f"tool:edit_memory_block:{edit}", "done")
        with model_server_process(0.0, 0.0, *steps) as url:
            http = Settings(
                data_dir=Path(tmp) / "http",
                model_provider="openai",
                model_base_url=url,
                model_id="bench",
                model_max_retries=0,
                _env_file=None,  # type: ignore[call-arg]
            )
            cpu, wall, turns = await measure(http, runs)
        print(
            f"HTTP to the test server: {cpu:.2f} ms CPU, {wall:.2f} ms wall per run "
            f"({turns} model calls, {runs} runs)"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
