"""Memory versioned by Dolt (`RALPH_MEMORY_VERSIONING=dolt`) on embedded doltlite: a real
`ralph serve` process (doltlite must be loaded before sqlite3, so the server, its agent
process and the probe below are processes of their own), one Dolt commit per change that
landed, with its author and why; operational tables in none."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ralph.testing.model_server import ModelServer, call, scripted, text
from ralph.testing.processes import free_port, start_server_process
from tests.helpers import notes_task

pytestmark = pytest.mark.slow

PROBE = """
import doltlite, json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(json.dumps({
    "tables": sorted({r[0] for r in db.execute(
        "SELECT table_name FROM dolt_diff WHERE commit_hash != 'WORKING'")}),
    "block_diffs": [list(r) for r in db.execute(
        "SELECT to_user_id, to_label, to_body, from_body, diff_type "
        "FROM dolt_diff_memory_blocks WHERE to_commit != 'WORKING' OR to_commit IS NULL")],
}))
"""


@pytest.fixture
def server(tmp_path: Path, model_server: ModelServer) -> Iterator[str]:
    port = free_port()
    env = {
        "RALPH_MEMORY_VERSIONING": "dolt",
        "RALPH_DATA_DIR": str(tmp_path / "data"),
        "RALPH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'ralph.db'}",
        "RALPH_MODEL_PROVIDER": "openai",
        "RALPH_MODEL_BASE_URL": model_server.base_url,
        "RALPH_MODEL_ID": "scripted",
        "RALPH_MODEL_MAX_RETRIES": "0",
        "RALPH_SCHEDULER_ENABLED": "false",
    }
    process = start_server_process(port, env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_every_change_is_one_dolt_commit(
    server: str, model_server: ModelServer, tmp_path: Path
) -> None:
    api = httpx.Client(base_url=server, timeout=60)
    assert api.post("/background/tasks", json=notes_task()).status_code == 201
    model_server.responder = scripted(
        call("edit_memory_block", label="notes", append="likes maths", reason="said so"),
        text("done"),
    )
    # the agent runs in the server's agent process: it writes the proposal through doltlite
    run = api.post("/background/tasks/nightly/run?wait=true").json()
    assert run["status"] == "success", run
    [proposal] = api.get(f"/proposals?run_id={run['id']}").json()
    approved = api.post(f"/proposals/{proposal['id']}/approve", json={"comment": "fine"})
    assert approved.status_code == 200, approved.text
    put = api.put("/users/u1/blocks/notes", json={"title": "Notes", "body": "likes art"})
    assert put.status_code == 200, put.text
    assert api.post("/users/u1/blocks/notes/revert", json={"version": 1}).status_code == 200
    # an approval and a PUT of one block at once: one commit each
    second = api.post(
        "/users/u1/proposals", json={"label": "notes", "append": "and chess", "reason": "r2"}
    ).json()

    def approve() -> int:
        return api.post(f"/proposals/{second['id']}/approve", json={}).status_code

    def rewrite() -> int:
        body = {"title": "Notes", "body": "likes maths, a lot"}
        return api.put("/users/u1/blocks/notes", json=body).status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = [f.result() for f in [pool.submit(approve), pool.submit(rewrite)]]
    assert statuses == [200, 200]
    assert api.delete("/users/u1/blocks/notes").status_code == 200

    history = api.get("/users/u1/blocks/notes/history").json()
    assert [v["version"] for v in history] == [6, 5, 4, 3, 2, 1]
    hashes = [v["dolt_commit"] for v in history]
    assert all(isinstance(h, str) and len(h) == 40 for h in hashes), history
    assert len(set(hashes)) == 6

    log: list[dict[str, Any]] = api.get("/users/u1/memory/log").json()
    assert [c["hash"] for c in log] == hashes  # one commit per version, newest first
    by_hash = {c["hash"]: c for c in log}
    first = by_hash[hashes[-1]]
    assert (first["author"], first["email"]) == ("agent:nightly", "agent-nightly@ralph")
    assert first["message"].startswith(f"approve proposal {proposal['id']}: append u1/notes v1")
    assert "reason: said so" in first["message"]
    assert "approved by: api" in first["message"]
    assert "comment: fine" in first["message"]
    assert by_hash[hashes[-2]]["message"] == "put u1/notes v2"
    assert by_hash[hashes[-2]]["author"] == "api"
    assert by_hash[hashes[-3]]["message"] == "revert to v1: u1/notes v3"
    middle = {by_hash[h]["message"].split(":")[0].split(" v")[0] for h in hashes[1:3]}
    assert middle == {"put u1/notes", f"approve proposal {second['id']}"}
    assert by_hash[hashes[0]]["message"] == "delete u1/notes v6"
    assert len(api.get("/users/u1/memory/log?label=notes&limit=2").json()) == 2

    # `ralph memory log` prints them as `dolt log` does
    printed = subprocess.run(
        [sys.executable, "-m", "ralph.cli", "memory", "log", "u1", "notes", "--url", server],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert printed.count("commit ") == 6
    assert f"commit {hashes[0]}" in printed
    assert "Author: agent:nightly <agent-nightly@ralph>" in printed

    # what Dolt itself holds: only the memory tables were ever committed
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "ralph.db")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    seen = json.loads(probe.stdout)
    assert seen["tables"] == ["memory_block_versions", "memory_blocks"]
    bodies = [row[2] for row in seen["block_diffs"] if row[4] != "removed"]
    assert "likes maths" in bodies
    assert "likes art" in bodies


def test_a_plain_sqlite_database_is_refused_clearly(tmp_path: Path) -> None:
    """Versioning switched on for a database doltlite did not create: one clear line."""
    data = tmp_path / "data"
    env = {"RALPH_DATA_DIR": str(data), "AGNO_TELEMETRY": "false", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "ralph.cli", "migrate"], env=env, check=True, timeout=60)
    refused = subprocess.run(
        [sys.executable, "-m", "ralph.cli", "serve"],
        env={**env, "RALPH_MEMORY_VERSIONING": "dolt"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "RALPH_MEMORY_VERSIONING=dolt, but this database has no Dolt version control" in (
        refused.stderr
    )
