"""kill -9 a server mid-run, start it again: the run is interrupted, its users finish once.

Real processes, so real time: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ralph.testing.model_server import Delay, ModelServer, scripted, text
from ralph.testing.processes import free_port, start_server_process

pytestmark = pytest.mark.slow


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer(scripted(text("ok"))) as server:
        yield server


def start_server(tmp_path: Path, port: int, model_url: str) -> subprocess.Popen[bytes]:
    env = {
        "RALPH_DATA_DIR": str(tmp_path / "data"),
        "RALPH_MODEL_PROVIDER": "openai",
        "RALPH_MODEL_BASE_URL": model_url,
        "RALPH_MODEL_ID": "scripted",
        "RALPH_MODEL_MAX_RETRIES": "0",
        "RALPH_RUN_LEASE_SECONDS": "2",
    }
    return start_server_process(port, env)


def test_kill_9_mid_run_then_restart(tmp_path: Path, model_server: ModelServer) -> None:
    def hang_for_b_and_c(request: dict[str, Any]) -> Any:
        system = str(request["messages"][0]["content"])
        return Delay(120, text("late")) if "user b" in system or "user c" in system else text("ok")

    model_server.responder = hang_for_b_and_c
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, model_server.base_url)
    try:
        for user in ("a", "b", "c"):
            httpx.put(f"{api}/users/{user}/blocks/student", json={"body": f"user {user}"})
        created = httpx.post(
            f"{api}/background/tasks",
            json={
                "name": "crashy",
                "system_prompt": "review",
                "tools": [],
                "memory_blocks": ["student"],
                "trigger": {"type": "cron", "schedule": "0 3 1 1 *"},
                "user_ids": ["a", "b", "c"],
                "batch_size": 3,
            },
        )
        assert created.status_code == 201, created.text
        run_id = httpx.post(f"{api}/background/tasks/crashy/run").json()["run_id"]

        def a_done_b_c_in_flight() -> bool:
            run = httpx.get(f"{api}/background/runs/{run_id}").json()
            return run["counts"] == {"success": 1, "running": 2}

        wait_for(a_done_b_c_in_flight)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()

    model_server.responder = scripted(text("ok"))
    server = start_server(tmp_path, port, model_server.base_url)
    try:

        def recovered() -> list[dict[str, Any]] | None:
            runs = httpx.get(f"{api}/background/tasks/crashy/runs").json()
            finished = [r for r in runs if r["status"] not in ("pending", "running")]
            return runs if len(runs) == 2 and len(finished) == 2 else None

        runs = wait_for(recovered)
        by_id = {r["id"]: r for r in runs}
        crashed = by_id.pop(run_id)
        (rerun,) = by_id.values()
        assert crashed["status"] == "interrupted"
        assert crashed["counts"] == {"success": 1, "interrupted": 2}
        assert rerun["status"] == "success"
        detail = httpx.get(f"{api}/background/runs/{rerun['id']}").json()
        assert sorted(u["user_id"] for u in detail["user_results"]) == ["b", "c"]
        # every user completed exactly once across both runs
        successes = [
            u["user_id"]
            for r in (crashed, rerun)
            for u in httpx.get(f"{api}/background/runs/{r['id']}").json()["user_results"]
            if u["status"] == "success"
        ]
        assert sorted(successes) == ["a", "b", "c"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
