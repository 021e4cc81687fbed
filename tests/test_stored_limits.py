"""What an agent's model sends is stored within the same limits on every path and every
database: a transcript within its cap (tool-call arguments included), titles and reasons
refused past their limits instead of cut by MariaDB, no NUL characters. Through the real path:
a task run over HTTP against the scripted model server, on SQLite and MariaDB."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.config import Settings
from ralph.testing.model_server import ModelServer, call, scripted, text
from tests.helpers import notes_task, serving, using_model_server

CAP = 20_000


@pytest.fixture
async def client(settings: Settings, model_server: ModelServer) -> AsyncIterator[AsyncClient]:
    configured = using_model_server(
        settings, model_server, wait_max_seconds=60.0, agent_transcript_max_chars=CAP
    )
    async with serving(configured) as client:
        yield client


async def run_once(client: AsyncClient) -> dict[str, Any]:
    await client.put("/users/u1/blocks/notes", json={"body": "day 1"})
    task = notes_task(name="limits", user_ids=["u1"], tools=["edit_memory_block"], max_turns=30)
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    run = (await client.post("/background/tasks/limits/run?wait=true")).json()
    user: dict[str, Any] = (await client.get(f"/background/runs/{run['id']}/users/u1")).json()
    return user


async def test_tool_call_arguments_count_against_the_transcript_cap(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """A model sending a 100,000-character body in each of 12 calls: the stored transcript
    stays within the cap (it held every argument whole: 1.1 MB against a 200,000 cap, past
    MariaDB's packet size, and the result was never recorded)."""
    big = "x" * 100_000
    calls = [
        call("edit_memory_block", label="notes", body=f"{i}{big}", reason="r") for i in range(12)
    ]
    model_server.responder = scripted(*calls, text("done"))
    user = await run_once(client)
    assert user["status"] == "success", user
    assert user["turns_used"] == 13
    stored = json.dumps(user["transcript"])
    assert len(stored) < CAP * 1.2, len(stored)
    assert any(entry.get("truncated") for entry in user["transcript"])


async def test_titles_and_reasons_past_their_limits_are_refused_on_every_path(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """The tool path refuses what the API refuses (MariaDB cut a 300-character title to 255
    and approval wrote the cut title into the block); the model is told why."""
    model_server.responder = scripted(
        call("edit_memory_block", label="notes", body="b1", title="t" * 300, reason="r"),
        call("edit_memory_block", label="notes", body="b2", reason="r" * 5_000),
        call("edit_memory_block", label="notes", body="b3\x00", reason="r"),
        call("edit_memory_block", label="notes", body="b4", title="\U0001f600" * 255, reason="r"),
        text("done"),
    )
    user = await run_once(client)
    assert user["status"] == "success", user
    results = [e["content"] for e in user["transcript"] if e["role"] == "tool"]
    assert "title is 300 characters; the limit is 255" in results[0]
    assert "reason is 5000 characters; the limit is 4000" in results[1]
    assert "NUL" in results[2]
    proposals = (await client.get("/proposals?user_id=u1")).json()
    assert [(p["body"], p["title"]) for p in proposals] == [("b4", "\U0001f600" * 255)]
    answer = await client.put("/users/u1/blocks/notes", json={"body": "a\u0000b"})
    assert answer.status_code == 422, answer.text
