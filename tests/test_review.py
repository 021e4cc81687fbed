"""Proposals at scale: superseding, bulk decisions, tasks whose approval is auto."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.authors import CHAT, Author
from ralph.config import Settings
from ralph.errors import Conflict
from ralph.memory.models import ProposalDraft, ProposalStatus
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import ModelServer, call, scripted, text
from tests.helpers import AppHarness, harness_for, using_model_server


def draft(
    body: str, *, author: str = "agent:nightly", run_id: str = "r1", **kw: Any
) -> ProposalDraft:
    values: dict[str, Any] = {"user_id": "u1", "label": "notes", "reason": "r"}
    values.update(kw)
    return ProposalDraft(author=author, body=body, run_id=run_id, **values)


async def test_a_tasks_new_proposal_supersedes_its_pending_one(harness: AppHarness) -> None:
    memory = harness.services.memory
    first, _ = await memory.propose(draft("monday", run_id="r1"))
    other_task, _ = await memory.propose(draft("from elsewhere", author="agent:weekly"))
    by_hand, _ = await memory.propose(draft("by hand", author="api"))
    other_block, _ = await memory.propose(draft("elsewhere", label="goals"))
    second, _ = await memory.propose(draft("tuesday", run_id="r2"))
    # the same run's second edit of the block keeps its first
    same_run, _ = await memory.propose(draft("tuesday, later", run_id="r2"))

    old = await memory.get_proposal(first.id)
    assert (old.status, old.superseded_by, old.decided_by) == (
        ProposalStatus.SUPERSEDED,
        second.id,
        "system:supersede",
    )
    pending = {p.id for p in await memory.list_proposals("u1", ProposalStatus.PENDING)}
    # another task's, a person's and another block's stay; the newest of this task's stays
    assert pending == {other_task.id, by_hand.id, other_block.id, second.id, same_run.id}
    # a person's new proposal supersedes nothing
    await memory.propose(draft("by hand again", author="api"))
    assert (await memory.get_proposal(by_hand.id)).status is ProposalStatus.PENDING


async def test_bulk_decisions_have_per_item_results(harness: AppHarness) -> None:
    client = harness.client
    memory = harness.services.memory
    await client.put("/users/u1/blocks/notes", json={"title": "N", "body": "v1"})
    fine, _ = await memory.propose(draft("fine", author="api", label="notes"))
    stale, _ = await memory.propose(draft("stale", author="api", label="notes", run_id="r9"))
    appended, _ = await memory.propose(
        ProposalDraft(user_id="u1", label="notes", reason="r", author="api", append="more")
    )
    ids = [fine.id, stale.id, appended.id, "no-such-proposal"]
    answer = await client.post("/proposals/approve", json={"ids": ids, "comment": "ok"})
    assert answer.status_code == 200, answer.text
    results = {r["id"]: r for r in answer.json()}
    assert [r["id"] for r in answer.json()] == ids  # in the order asked
    assert (results[fine.id]["decided"], results[fine.id]["status"]) == (True, "approved")
    assert results[fine.id]["applied_version"] == 2
    # `fine` rewrote the block: `stale` (a whole body based on v1) was superseded by it
    assert (results[stale.id]["decided"], results[stale.id]["status"]) == (False, "superseded")
    assert "already superseded" in results[stale.id]["error"]
    assert (results[appended.id]["status"], results[appended.id]["applied_version"]) == (
        "approved",
        3,
    )
    assert results["no-such-proposal"]["status"] is None
    assert "not found" in results["no-such-proposal"]["error"]
    block = (await client.get("/users/u1/blocks/notes")).json()
    assert block["body"] == "fine\nmore"
    decided = (await client.get(f"/proposals/{fine.id}")).json()
    assert (decided["decided_by"], decided["comment"]) == ("api", "ok")


async def test_bulk_decisions_by_run(harness: AppHarness) -> None:
    client = harness.client
    memory = harness.services.memory
    mine = [
        (await memory.propose(draft(f"{i}", user_id=f"u{i}", run_id="run-a")))[0].id
        for i in range(5)
    ]
    other, _ = await memory.propose(draft("x", user_id="u1", label="goals", run_id="run-b"))
    rejected = await client.post("/proposals/reject", json={"run_id": "run-a"})
    assert {(r["id"], r["status"]) for r in rejected.json()} == {(i, "rejected") for i in mine}
    assert (await memory.get_proposal(other.id)).status is ProposalStatus.PENDING
    again = await client.post("/proposals/reject", json={"run_id": "run-a"})
    assert again.json() == []  # nothing of it is pending any more

    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "give ids"),
        ({"ids": ["a"], "run_id": "run-a"}, "not both"),
        ({"ids": []}, "at least 1"),
        ({"run_id": ""}, "at least 1"),
    ]
    for body, words in bad:
        answer = await client.post("/proposals/approve", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert words in answer.text, answer.text


@pytest.fixture
async def auto(settings: Settings, model_server: ModelServer, clock: FakeClock) -> Any:
    settings = using_model_server(settings, model_server, wait_max_seconds=30.0)
    async with harness_for(settings, clock, server=model_server) as harness:
        yield harness


async def test_an_auto_tasks_proposals_are_approved_at_once(auto: AppHarness) -> None:
    client = auto.client
    task = {
        "name": "trusted",
        "system_prompt": "keep notes",
        "tools": ["edit_memory_block"],
        "trigger": {"type": "idle", "idle_minutes": 30},
        "user_ids": ["u1"],
        "approval": "auto",
    }
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    assert auto.server is not None
    auto.server.responder = scripted(
        call("edit_memory_block", label="notes", append="likes maths", reason="said so"),
        text("done"),
    )
    run = (await client.post("/background/tasks/trusted/run?wait=true")).json()
    assert run["status"] == "success"
    made = (await client.get(f"/proposals?run_id={run['id']}")).json()
    assert [(p["status"], p["decided_by"]) for p in made] == [("approved", "system:auto")]
    block = (await client.get("/users/u1/blocks/notes")).json()
    assert (block["body"], block["version"]) == ("likes maths", 1)
    assert (await client.get("/proposals?status=pending")).json() == []

    # a dry run of an auto task still only previews
    await client.post("/background/tasks/trusted/run?wait=true", json={"dry_run": True})
    assert (await client.get("/users/u1/blocks/notes")).json()["version"] == 1


async def test_an_auto_proposal_that_conflicts_stays_pending(harness: AppHarness) -> None:
    client = harness.client
    memory = harness.services.memory
    await client.put("/users/u1/blocks/notes", json={"title": "N", "body": "v1"})
    rewrite, _ = await memory.propose(draft("rewritten"))
    await client.put("/users/u1/blocks/notes", json={"title": "N", "body": "v2 by a person"})
    with pytest.raises(Conflict):
        await memory.auto_approve(rewrite.id)
    assert (await memory.get_proposal(rewrite.id)).status is ProposalStatus.PENDING
    assert (await client.get("/users/u1/blocks/notes")).json()["body"] == "v2 by a person"


async def test_pending_proposals_expire_once_across_replicas(
    settings: Settings, clock: FakeClock
) -> None:
    settings = settings.model_copy(update={"proposal_ttl_days": 2.0})
    async with harness_for(settings, clock) as one, harness_for(settings, clock) as two:
        memory = one.services.memory
        start = clock.now()
        old, _ = await memory.propose(draft("old"))
        await clock.advance(timedelta(days=1))
        young, _ = await memory.propose(draft("young", label="goals"))
        decided, _ = await memory.propose(draft("decided", label="plans"))
        await memory.reject(decided.id)
        await clock.set(start + timedelta(days=2, seconds=1))
        counts = await asyncio.gather(
            one.services.memory.expire_pending(2.0), two.services.memory.expire_pending(2.0)
        )
        assert sorted(counts) == [0, 1]
        expired = await memory.get_proposal(old.id)
        assert (expired.status, expired.decided_by) == (ProposalStatus.EXPIRED, "system:expire")
        assert (await memory.get_proposal(young.id)).status is ProposalStatus.PENDING
        assert (await memory.get_proposal(decided.id)).status is ProposalStatus.REJECTED
        # the scheduler's pass sweeps: a day later the young one goes too
        await clock.advance(timedelta(days=1))
        await asyncio.gather(one.services.scheduler.tick(), two.services.scheduler.tick())
        assert (await memory.get_proposal(young.id)).status is ProposalStatus.EXPIRED
        queue = (await one.client.get("/proposals?status=expired")).json()
        assert {p["id"] for p in queue} == {old.id, young.id}


def test_authors_are_values_with_their_rules() -> None:
    nightly = Author.of_task("nightly")
    assert (str(nightly), nightly.task, nightly.is_agent) == ("agent:nightly", "nightly", True)
    assert Author.parse("agent:nightly") == nightly
    assert Author.parse("agent:chat") == CHAT
    assert (CHAT.task, CHAT.is_agent, CHAT.supersedes_its_own) == (None, True, False)
    assert nightly.supersedes_its_own
    for stored in ("api", "user", "reviewer", "reviewer:ann", "system:auto", "agent:x-1"):
        assert str(Author.parse(stored)) == stored
    assert not Author.parse("reviewer:ann").is_agent
    with pytest.raises(ValueError, match="chat agent"):
        Author.of_task("chat")


async def test_no_task_can_speak_for_the_chat_agent(client: AsyncClient) -> None:
    """`chat` is not a task name: a task's proposals never supersede (or pass for) the chat
    agent's; `?task=chat` lists the chat agent's."""
    refused = await client.post(
        "/background/tasks",
        json={
            "name": "chat",
            "system_prompt": "x",
            "trigger": {"type": "cron", "schedule": "0 3 * * *"},
            "user_ids": ["u1"],
        },
    )
    assert refused.status_code == 422
    assert "reserved" in refused.text
    await client.put("/users/u1/blocks/notes", json={"body": "likes art"})
    by_chat = {"label": "notes", "append": "likes chess", "reason": "said", "author": "agent:chat"}
    chat_made = (await client.post("/users/u1/proposals", json=by_chat)).json()
    other = by_chat | {"append": "likes go", "author": "agent:nightly", "run_id": "r1"}
    assert (await client.post("/users/u1/proposals", json=other)).status_code == 201
    again = by_chat | {"append": "likes tea"}
    assert (await client.post("/users/u1/proposals", json=again)).status_code == 201
    assert (await client.get(f"/proposals/{chat_made['id']}")).json()["status"] == "pending"
    listed = (await client.get("/proposals?task=chat")).json()
    assert sorted(p["new_text"] for p in listed) == ["likes chess", "likes tea"]
