"""How long a server's processes live: a stop during the agent process's start is bounded, and
the agent process does not outlive a server killed with SIGKILL. Real processes, real time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ralph.testing.model_server import Delay, ModelServer, scripted, text
from ralph.testing.processes import free_port, scripted_model_env, start_server_process
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command's name is in parentheses and may hold spaces: the fields follow it
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    # every call takes long: the run is still going when the server is stopped
    with ModelServer(scripted(Delay(20.0, text("ok")))) as server:
        yield server


def started_server(
    tmp_path: Path, model_server: ModelServer
) -> tuple[subprocess.Popen[bytes], str]:
    """A fresh server (its agent process still starting) with a run of four users begun."""
    port = free_port()
    env = scripted_model_env(
        tmp_path / "data", model_server.base_url, RALPH_SHUTDOWN_GRACE_SECONDS="1"
    )
    server = start_server_process(port, env)
    api = f"http://127.0.0.1:{port}"
    created = httpx.post(
        f"{api}/background/tasks",
        json={
            "name": "slow",
            "system_prompt": "review",
            "trigger": {"type": "cron", "schedule": "0 3 1 1 *"},
            "user_ids": ["a", "b", "c", "d"],
        },
    )
    assert created.status_code == 201, created.text
    assert httpx.post(f"{api}/background/tasks/slow/run").status_code == 202
    return server, api


def test_sigterm_while_the_agent_process_starts_is_bounded(
    tmp_path: Path, model_server: ModelServer
) -> None:
    """SIGTERM one second after a fresh server's first run starts: the server is gone within
    its grace and a few seconds (it took 31 s: units the child read after `stop` ran on)."""
    server, _ = started_server(tmp_path, model_server)
    try:
        time.sleep(1.0)
        stopped = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        assert time.monotonic() - stopped < 10
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_agent_process_dies_with_its_server(tmp_path: Path, model_server: ModelServer) -> None:
    """SIGKILL of the server (a supervisor's last word) leaves no agent process behind, even one
    still starting (one was left orphaned, holding the SQLite file for minutes)."""
    server, _ = started_server(tmp_path, model_server)
    children: list[int] = []
    try:
        children = wait_for(lambda: children_of(server.pid), timeout=10)
        server.kill()
        server.wait()
        # the kernel's doing: at once (a child left to notice by itself took seconds to
        # minutes, by what its start was waiting for)
        wait_for(lambda: not any(alive(child) for child in children), timeout=1)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for child in children:
            if alive(child):
                os.kill(child, signal.SIGKILL)
