"""Evidence on every proposal: an agent's proposal records the messages it had (its episode,
what its `query_messages` calls returned) and, for a chained task, the upstream runs;
`GET /proposals/{id}` shows them with their text, or why one cannot be shown, and the console
shows them under the diff. Through the HTTP API and the scripted model, SQLite and MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import delete

from ralph.config import Settings
from ralph.db.tables import messages
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import ModelServer, call, scripted, text
from tests.helpers import AppHarness, harness_for, notes_task, using_model_server


@pytest.fixture
async def app(
    settings: Settings, clock: FakeClock, model_server: ModelServer
) -> AsyncIterator[AppHarness]:
    async with harness_for(using_model_server(settings, model_server), clock) as harness:
        yield harness


async def test_a_proposal_shows_the_messages_it_was_based_on(
    app: AppHarness, clock: FakeClock, model_server: ModelServer
) -> None:
    client = app.client
    await client.put("/users/u1/blocks/notes", json={"body": "likes art"})
    said: dict[str, int] = {}
    for content in ("my dog is Rex", "my exam is on Friday", "I like chess"):
        answer = await client.post("/users/u1/messages", json={"content": content})
        assert answer.status_code == 201, answer.text
        said[content] = answer.json()["id"]
        await clock.advance(timedelta(minutes=1))
    other = await client.post("/users/u2/messages", json={"content": "my exam is in May"})
    assert other.status_code == 201
    task = notes_task(tools=["edit_memory_block", "query_messages"], episode_messages=1)
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    model_server.responder = scripted(
        call("query_messages", query="exam"),
        call("edit_memory_block", label="notes", append="exam on Friday", reason="said so"),
        text("done"),
    )
    run = (await client.post("/background/tasks/nightly/run?wait=true")).json()
    assert run["counts"] == {"success": 1}, run
    (proposal,) = (await client.get("/users/u1/proposals")).json()
    # the episode (the newest message), then what the search returned (u1's only)
    assert proposal["evidence"] == {
        "messages": [str(said["I like chess"]), str(said["my exam is on Friday"])],
        "upstream_runs": [],
    }
    detail = (await client.get(f"/proposals/{proposal['id']}")).json()
    assert [(m["role"], m["content"]) for m in detail["evidence_messages"]] == [
        ("user", "I like chess"),
        ("user", "my exam is on Friday"),
    ]
    assert detail["transcript_url"] == f"/background/runs/{run['id']}/users/u1"

    page = await client.get("/console")
    assert "Based on 2 messages" in page.text
    assert "my exam is on Friday" in page.text

    # a message deleted since is named, with why it cannot be shown
    async with app.services.engine.begin() as conn:
        await conn.execute(delete(messages).where(messages.c.id == said["my exam is on Friday"]))
    detail = (await client.get(f"/proposals/{proposal['id']}")).json()
    assert detail["evidence_messages"][1] == {
        "ref": str(said["my exam is on Friday"]),
        "role": None,
        "content": None,
        "created_at": None,
        "note": "deleted",
    }


async def test_a_persons_proposal_has_no_evidence(app: AppHarness) -> None:
    client = app.client
    made = await client.post(
        "/users/u1/proposals", json={"label": "notes", "append": "likes tea", "reason": "r"}
    )
    assert made.status_code == 201, made.text
    detail = (await client.get(f"/proposals/{made.json()['id']}")).json()
    assert (detail["evidence"], detail["evidence_messages"], detail["transcript_url"]) == (
        None,
        [],
        None,
    )
