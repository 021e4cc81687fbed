"""Reviewers teach the agents: a change a reviewer rejected is in the task's next input for
that user, with the reviewer's comment, and the agent cannot propose it again within the
remembered window (a person still can). Through the HTTP API, the scripted model, SQLite and
MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from ralph.config import Settings
from ralph.memory.models import Proposal, ProposalKind, ProposalStatus
from ralph.memory.service import REJECTIONS_MAX_CHARS, rejections_context
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import ModelServer, call, scripted, text
from tests.helpers import AppHarness, harness_for, notes_task, using_model_server

GUESS = call("edit_memory_block", label="notes", append="likes chess", reason="a guess")


@pytest.fixture
async def app(
    settings: Settings, clock: FakeClock, model_server: ModelServer
) -> AsyncIterator[AppHarness]:
    async with harness_for(using_model_server(settings, model_server), clock) as harness:
        yield harness


async def run_user(app: AppHarness) -> dict[str, Any]:
    run = (await app.client.post("/background/tasks/nightly/run?wait=true")).json()
    user: dict[str, Any] = (await app.client.get(f"/background/runs/{run['id']}/users/u1")).json()
    return user


async def test_a_rejected_change_is_shown_to_the_agent_and_not_proposed_again(
    app: AppHarness, clock: FakeClock, model_server: ModelServer
) -> None:
    client = app.client
    await client.put("/users/u1/blocks/notes", json={"body": "likes art"})
    assert (await client.post("/background/tasks", json=notes_task())).status_code == 201
    model_server.responder = scripted(GUESS, text("done"))
    first = await run_user(app)
    assert first["proposals_created"] == 1
    (proposal,) = (await client.get("/users/u1/proposals?status=pending")).json()
    rejected = await client.post(
        f"/proposals/{proposal['id']}/reject", json={"comment": "they never said so"}
    )
    assert rejected.status_code == 200, rejected.text

    await clock.advance(timedelta(days=1))
    model_server.requests.clear()
    second = await run_user(app)
    instructions = model_server.requests[0]["messages"][0]["content"]
    assert "# Changes a reviewer rejected or corrected for this user" in instructions
    assert 'block notes: append "likes chess" (reviewer: "they never said so")' in instructions
    (answer,) = [m["content"] for m in second["transcript"] if m["role"] == "tool"]
    assert "rejected_before" in answer
    assert (second["status"], second["proposals_created"], second["proposals_refused"]) == (
        "success",
        0,
        1,
    )
    assert (await client.get("/users/u1/proposals?status=pending")).json() == []

    # a person may still propose it
    by_hand = {"label": "notes", "append": "likes chess", "reason": "asked them"}
    assert (await client.post("/users/u1/proposals", json=by_hand)).status_code == 201

    # past the remembered window (30 days), the agent may propose it again
    await client.post(f"/proposals/{(await pending(app))[0]['id']}/reject", json={})
    await clock.advance(timedelta(days=31))
    model_server.requests.clear()
    later = await run_user(app)
    assert later["proposals_created"] == 1
    assert "rejected" not in model_server.requests[0]["messages"][0]["content"]


async def pending(app: AppHarness) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (
        await app.client.get("/users/u1/proposals?status=pending")
    ).json()
    return found


def test_the_rejections_shown_are_bounded() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 1, 1, tzinfo=UTC)
    many = [
        Proposal(
            id=str(i),
            user_id="u1",
            label="notes",
            kind=ProposalKind.APPEND,
            title=None,
            body=None,
            old_text=None,
            new_text="x" * 1000,
            reason="r",
            author="agent:nightly",
            run_id=None,
            base_version=0,
            status=ProposalStatus.REJECTED,
            diff="",
            comment="no",
            applied_version=None,
            created_at=at,
            decided_at=at,
        )
        for i in range(30)
    ]
    shown = rejections_context(many)
    assert len(shown) <= REJECTIONS_MAX_CHARS + 200
    assert shown.count("\n- ") >= 5
    assert rejections_context([]) == ""


async def test_the_root_address_opens_the_console(app: AppHarness, tmp_path: Any) -> None:
    response = await app.client.get("/", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (307, "/console")


async def test_an_edited_approval_applies_the_reviewers_version_and_teaches_the_agent(
    app: AppHarness, clock: FakeClock, model_server: ModelServer
) -> None:
    client = app.client
    await client.put("/users/u1/blocks/notes", json={"body": "likes art"})
    assert (await client.post("/background/tasks", json=notes_task())).status_code == 201
    model_server.responder = scripted(GUESS, text("done"))
    await run_user(app)
    (proposal,) = await pending(app)
    url = f"/proposals/{proposal['id']}/approve"
    # the reviewer's version is of the proposal's kind, and one at most
    wrong = await client.post(url, json={"body": "likes art\nplays chess"})
    assert wrong.status_code == 422
    assert "give your version as `append`" in wrong.text
    both = await client.post(url, json={"append": "a", "new_text": "b"})
    assert both.status_code == 422
    assert (await pending(app))[0]["id"] == proposal["id"]

    approved = await client.post(url, json={"append": "plays chess on Sundays", "comment": "ok"})
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert (body["status"], body["edited"], body["decided_by"]) == ("approved", True, "api")
    assert (body["new_text"], body["applied_text"]) == ("likes chess", "plays chess on Sundays")
    block = (await client.get("/users/u1/blocks/notes")).json()
    assert block["body"] == "likes art\nplays chess on Sundays"
    history = (await client.get("/users/u1/blocks/notes/history")).json()
    assert history[0]["proposal_id"] == proposal["id"]

    # the next run's agent sees how the reviewer corrected it
    await clock.advance(timedelta(days=1))
    model_server.requests.clear()
    model_server.responder = scripted(text("done"))
    await run_user(app)
    instructions = model_server.requests[0]["messages"][0]["content"]
    assert (
        'block notes: append "likes chess", approved as "plays chess on Sundays" instead '
        '(reviewer: "ok")'
    ) in instructions


async def test_a_rewrite_and_a_replacement_take_the_reviewers_version(app: AppHarness) -> None:
    client = app.client
    await client.put("/users/u2/blocks/notes", json={"body": "likes art"})
    rewrite = {"label": "notes", "body": "likes art and maths", "reason": "r"}
    made = (await client.post("/users/u2/proposals", json=rewrite)).json()
    answer = await client.post(
        f"/proposals/{made['id']}/approve", json={"body": "likes art and physics"}
    )
    assert answer.status_code == 200, answer.text
    replace = {"label": "notes", "old_text": "art", "new_text": "painting", "reason": "r"}
    made = (await client.post("/users/u2/proposals", json=replace)).json()
    answer = await client.post(f"/proposals/{made['id']}/approve", json={"new_text": "drawing"})
    assert answer.status_code == 200, answer.text
    block = (await client.get("/users/u2/blocks/notes")).json()
    assert block["body"] == "likes drawing and physics"
    # a plain approval is not an edited one
    plain = (await client.post("/users/u2/proposals", json=_note("likes tea"))).json()
    approved = (await client.post(f"/proposals/{plain['id']}/approve")).json()
    assert (approved["edited"], approved["applied_text"]) == (False, None)


def _note(text: str) -> dict[str, str]:
    return {"label": "notes", "append": text, "reason": "r"}
