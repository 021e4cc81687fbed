"""Stop a server mid-run (kill -9, or SIGTERM as a deploy does), start it again at once: the
run is interrupted and its users finish exactly once, within the lease and a tick; on SQLite
and MariaDB.

Real processes, so real time: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ralph.testing.model_server import Delay, Fail, ModelServer, scripted, text
from ralph.testing.processes import free_port, scripted_model_env, start_server_process
from tests.helpers import empty_database, wait_for

pytestmark = pytest.mark.slow


# longer than a server takes to start, so the restarted server cannot find the rerun due at
# its first tick: it must wake for it
LEASE_SECONDS = 5


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer(scripted(text("ok"))) as server:
        yield server


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database the server processes migrate themselves."""
    yield from empty_database(request.param, tmp_path)


def start_server(
    tmp_path: Path, port: int, model_url: str, database_url: str
) -> subprocess.Popen[bytes]:
    env = scripted_model_env(
        tmp_path / "data",
        model_url,
        RALPH_DATABASE_URL=database_url,
        RALPH_RUN_LEASE_SECONDS=str(LEASE_SECONDS),
        RALPH_SHUTDOWN_GRACE_SECONDS="0.2",
    )
    return start_server_process(port, env)


def successes_by_user(api: str, task: str) -> dict[str, int]:
    """How many times each user succeeded, over all the task's runs."""
    counts: dict[str, int] = {}
    for run in httpx.get(f"{api}/background/tasks/{task}/runs").json():
        detail = httpx.get(f"{api}/background/runs/{run['id']}?users_limit=1000").json()
        for user in detail["user_results"]:
            if user["status"] == "success":
                counts[user["user_id"]] = counts.get(user["user_id"], 0) + 1
    return counts


def test_sigterm_mid_run_then_immediate_restart(
    tmp_path: Path, model_server: ModelServer, database_url: str
) -> None:
    """A deploy: the stopping server queues the users it did not finish; the next server
    starts them one lease after the stop, even with no slot of any task due for a year."""
    model_server.responder = scripted(Delay(1.0, text("ok")))
    users = [f"user-{i}" for i in range(10)]
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, model_server.base_url, database_url)
    try:
        created = httpx.post(
            f"{api}/background/tasks",
            json={
                "name": "deployed",
                "system_prompt": "review",
                "trigger": {"type": "cron", "schedule": "0 3 1 1 *"},
                "user_ids": users,
                "batch_size": 5,
            },
        )
        assert created.status_code == 201, created.text
        run_id = httpx.post(f"{api}/background/tasks/deployed/run").json()["run_id"]
        wait_for(
            lambda: (
                httpx.get(f"{api}/background/runs/{run_id}").json()["counts"].get("success", 0) >= 5
            )
        )
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)  # uvicorn ends a graceful stop by re-raising the signal
    finally:
        if server.poll() is None:
            server.kill()
    stopped = time.monotonic()
    server = start_server(tmp_path, port, model_server.base_url, database_url)
    try:
        first = httpx.get(f"{api}/background/runs/{run_id}").json()
        assert first["status"] == "interrupted"
        assert 5 <= first["counts"]["success"] < 10
        wait_for(lambda: successes_by_user(api, "deployed") == dict.fromkeys(users, 1), 30)
        # started one lease after the stop, then one model call per user in batches of 5;
        # the bound also holds a cold start of the server and of its agent process, which
        # import in parallel on two cores (3-6 s each when the machine is busy)
        assert time.monotonic() - stopped < LEASE_SECONDS + 15
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_kill_9_mid_run_then_restart(
    tmp_path: Path, model_server: ModelServer, database_url: str
) -> None:
    def hang_for_b_and_c(request: dict[str, Any]) -> Any:
        system = str(request["messages"][0]["content"])
        return Delay(120, text("late")) if "user b" in system or "user c" in system else text("ok")

    model_server.responder = hang_for_b_and_c
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, model_server.base_url, database_url)
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
    server = start_server(tmp_path, port, model_server.base_url, database_url)
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


def test_a_retry_survives_kill_9(
    tmp_path: Path, model_server: ModelServer, database_url: str
) -> None:
    """A user waits for its retry when the server is killed: the restarted server's recovery
    runs it at its time (not at once, not twice), as its second attempt."""
    model_server.responder = scripted(Fail(500, "provider down"))
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, model_server.base_url, database_url)
    try:
        created = httpx.post(
            f"{api}/background/tasks",
            json={
                "name": "flaky",
                "system_prompt": "review",
                "trigger": {"type": "cron", "schedule": "0 3 1 1 *"},
                "user_ids": ["a"],
                # due well after the restarted server's recovery (one lease after the kill)
                "retry": {"max_attempts": 3, "backoff_seconds": 12, "jitter": False},
            },
        )
        assert created.status_code == 201, created.text
        run_id = httpx.post(f"{api}/background/tasks/flaky/run").json()["run_id"]

        def retrying() -> dict[str, Any] | None:
            user = httpx.get(f"{api}/background/runs/{run_id}/users/a").json()
            return user if user["status"] == "retrying" else None

        due = wait_for(retrying)["next_attempt_at"]
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    failed_calls = model_server.calls
    model_server.responder = scripted(text("ok"))
    server = start_server(tmp_path, port, model_server.base_url, database_url)
    try:

        def rerun_done() -> dict[str, Any] | None:
            runs = httpx.get(f"{api}/background/tasks/flaky/runs").json()
            reruns = [r for r in runs if r["trigger_type"] == "rerun"]
            return reruns[0] if reruns and reruns[0]["status"] == "success" else None

        rerun = wait_for(rerun_done, 60)
        user = httpx.get(f"{api}/background/runs/{rerun['id']}/users/a").json()
        assert (user["status"], user["attempts"]) == ("success", 2)
        assert user["started_at"] >= due  # at its time, not at the recovery
        assert model_server.calls == failed_calls + 1  # once
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


# on SQLite only: the same path on MariaDB and PostgreSQL is tested in one process
# (tests/test_chains.py, a restart between A and B), and each kill here costs 15 s
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_chain_survives_kill_9_between_a_and_b(
    tmp_path: Path, model_server: ModelServer, database_url: str
) -> None:
    """The server is killed after task A ended for the users and before B (which follows A,
    8 s later) started: the restarted server runs B for each of them, once."""
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, model_server.base_url, database_url)
    try:
        for name, trigger in (
            ("summarise", {"type": "cron", "schedule": "0 3 1 1 *"}),
            ("progress", {"type": "after", "task": "summarise", "delay_seconds": 8}),
        ):
            created = httpx.post(
                f"{api}/background/tasks",
                json={
                    "name": name,
                    "system_prompt": name,
                    "trigger": trigger,
                    "user_ids": ["a", "b"],
                },
            )
            assert created.status_code == 201, created.text
        ran = httpx.post(f"{api}/background/tasks/summarise/run?wait=true", timeout=30)
        assert ran.json()["status"] == "success", ran.text
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    server = start_server(tmp_path, port, model_server.base_url, database_url)
    try:

        def followed() -> list[dict[str, Any]] | None:
            runs = httpx.get(f"{api}/background/tasks/progress/runs").json()
            return runs if runs and runs[0]["status"] == "success" else None

        [run] = wait_for(followed, 60)
        assert run["trigger_type"] == "after"
        assert successes_by_user(api, "progress") == {"a": 1, "b": 1}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
