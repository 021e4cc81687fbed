"""An idle episode on the real clock: `ralph serve` in its own process, `idle_minutes` 1."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from ralph.testing.processes import free_port, start_server_process

pytestmark = pytest.mark.slow


async def test_an_idle_run_starts_60_to_62_seconds_after_the_message(tmp_path: Path) -> None:
    port = free_port()
    server = await asyncio.to_thread(
        start_server_process, port, {"RALPH_DATA_DIR": str(tmp_path / "data")}
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            task = {
                "name": "summarise",
                "system_prompt": "summarise the conversation",
                "trigger": {"type": "idle", "idle_minutes": 1},
                "user_ids": ["ann"],
            }
            assert (await api.post("/background/tasks", json=task)).status_code == 201
            message = await api.post("/users/ann/messages", json={"content": "hello"})
            assert message.status_code == 201, message.text
            sent = datetime.fromisoformat(message.json()["created_at"])
            deadline = time.monotonic() + 80
            runs: list[dict[str, str]] = []
            while not runs and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                runs = (await api.get("/background/tasks/summarise/runs")).json()
            assert len(runs) == 1, runs
            started = datetime.fromisoformat(runs[0]["created_at"])
            assert runs[0]["trigger_type"] == "idle"
            assert 60 <= (started - sent).total_seconds() < 62
    finally:
        server.terminate()
        await asyncio.to_thread(server.wait, 30)
