"""Memory blocks, history and proposals over the HTTP API, on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.errors import AlreadyRejected
from ralph.memory.models import ProposalDraft, ProposalStatus
from ralph.testing.clock import FakeClock
from tests.helpers import AppHarness

BLOCK = "/users/u1/blocks/student"


async def test_every_change_is_kept_in_history(client: AsyncClient) -> None:
    first = await client.put(BLOCK, json={"title": "Student", "body": "likes maths"})
    assert first.status_code == 200
    assert first.json()["version"] == 1
    second = await client.put(BLOCK, json={"body": "likes maths and physics", "author": "user"})
    assert second.json()["version"] == 2
    assert second.json()["title"] == "Student"  # kept when not given

    history = (await client.get(f"{BLOCK}/history")).json()
    assert [(v["version"], v["author"]) for v in history] == [(2, "user"), (1, "api")]
    old = (await client.get(f"{BLOCK}/history/1")).json()
    assert old["body"] == "likes maths"

    deleted = await client.delete(BLOCK)
    assert deleted.json() == {"deleted": True, "version": 3}
    assert (await client.get(BLOCK)).status_code == 404
    history = (await client.get(f"{BLOCK}/history")).json()
    assert (history[0]["version"], history[0]["deleted"]) == (3, True)

    recreated = await client.put(BLOCK, json={"title": "Student", "body": "new start"})
    assert recreated.json()["version"] == 4  # numbering continues past the deletion


async def test_revert_makes_an_earlier_version_the_next_one(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "Student", "body": "likes maths"})
    await client.put(BLOCK, json={"title": "Pupil", "body": "a wrong edit"})
    reverted = await client.post(f"{BLOCK}/revert", json={"version": 1, "author": "user"})
    assert reverted.status_code == 200
    assert (reverted.json()["version"], reverted.json()["title"]) == (3, "Student")
    assert reverted.json()["body"] == "likes maths"
    history = (await client.get(f"{BLOCK}/history")).json()
    assert [(v["version"], v["author"]) for v in history] == [(3, "user"), (2, "api"), (1, "api")]

    stale = await client.post(f"{BLOCK}/revert", json={"version": 2, "expected_version": 2})
    assert stale.status_code == 409
    await client.delete(BLOCK)  # version 4
    assert (await client.post(f"{BLOCK}/revert", json={"version": 4})).status_code == 422
    back = await client.post(f"{BLOCK}/revert", json={"version": 3})
    assert (back.json()["version"], back.json()["body"]) == (5, "likes maths")
    assert (await client.post(f"{BLOCK}/revert", json={"version": 9})).status_code == 404
    assert (await client.post(f"{BLOCK}/revert", json={"version": 0})).status_code == 422


async def test_expected_version_mismatch_is_409(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "S", "body": "a"})
    ok = await client.put(BLOCK, json={"body": "b", "expected_version": 1})
    assert ok.status_code == 200
    stale = await client.put(BLOCK, json={"body": "c", "expected_version": 1})
    assert stale.status_code == 409
    assert stale.json()["current_version"] == 2
    assert (await client.get(BLOCK)).json()["body"] == "b"

    must_be_new = await client.put(BLOCK, json={"body": "d", "expected_version": 0})
    assert must_be_new.status_code == 409
    fresh = await client.put("/users/u1/blocks/other", json={"body": "d", "expected_version": 0})
    assert fresh.status_code == 200


async def test_concurrent_conditional_writes_one_wins(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "S", "body": "base"})
    results = await asyncio.gather(
        *[client.put(BLOCK, json={"body": f"w{i}", "expected_version": 1}) for i in range(5)]
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 409, 409, 409, 409]
    history = (await client.get(f"{BLOCK}/history")).json()
    assert [v["version"] for v in history] == [2, 1]


async def _propose(client: AsyncClient, **fields: object) -> dict[str, Any]:
    response = await client.post("/users/u1/proposals", json={"reason": "why not", **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_proposal_leaves_block_alone_until_approved(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "Student", "body": "line one\nline two\n"})
    proposal = await _propose(client, label="student", body="line one\nline 2\n")
    assert proposal["status"] == "pending"
    assert proposal["base_version"] == 1
    assert proposal["diff"] == (
        "--- student (current)\n+++ student (proposed)\n@@ -1,2 +1,2 @@\n"
        " line one\n-line two\n+line 2\n"
    )
    assert (await client.get(BLOCK)).json()["body"] == "line one\nline two\n"
    pending = (await client.get("/users/u1/proposals", params={"status": "pending"})).json()
    assert [p["id"] for p in pending] == [proposal["id"]]

    approved = await client.post(f"/proposals/{proposal['id']}/approve", json={"comment": "ok"})
    assert approved.status_code == 200
    assert approved.json()["status"] == "approved"
    assert approved.json()["applied_version"] == 2
    block = (await client.get(BLOCK)).json()
    assert block["body"] == "line one\nline 2\n"
    history = (await client.get(f"{BLOCK}/history")).json()
    assert history[0]["author"] == "api"
    assert history[0]["proposal_id"] == proposal["id"]


async def test_deciding_twice_is_409(client: AsyncClient) -> None:
    proposal = await _propose(client, label="student", body="x")
    assert (await client.post(f"/proposals/{proposal['id']}/reject")).status_code == 200
    again = await client.post(f"/proposals/{proposal['id']}/reject")
    assert again.status_code == 409
    assert again.json()["status"] == "rejected"
    assert (await client.post(f"/proposals/{proposal['id']}/approve")).status_code == 409
    assert (await client.get(BLOCK)).status_code == 404

    other = await _propose(client, label="student", body="y")
    assert (await client.post(f"/proposals/{other['id']}/approve")).status_code == 200
    assert (await client.post(f"/proposals/{other['id']}/approve")).status_code == 409
    assert [v["version"] for v in (await client.get(f"{BLOCK}/history")).json()] == [1]


async def test_proposal_for_missing_block_creates_it(client: AsyncClient) -> None:
    proposal = await _propose(client, label="progress", body="week 1 done", title="Progress")
    assert proposal["base_version"] == 0
    await client.post(f"/proposals/{proposal['id']}/approve")
    block = (await client.get("/users/u1/blocks/progress")).json()
    assert (block["title"], block["body"], block["version"]) == ("Progress", "week 1 done", 1)


async def test_whole_body_proposal_on_changed_block_conflicts(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "S", "body": "v1"})
    proposal = await _propose(client, label="student", body="agent's v2")
    await client.put(BLOCK, json={"body": "human's v2"})
    response = await client.post(f"/proposals/{proposal['id']}/approve")
    assert response.status_code == 409
    assert response.json()["status"] == "conflict"
    assert (await client.get(BLOCK)).json()["body"] == "human's v2"
    stored = (await client.get(f"/proposals/{proposal['id']}")).json()
    assert stored["status"] == "conflict"


async def test_replace_edit_applies_on_changed_block_when_clean(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "S", "body": "Name: Ann\nGoal: algebra\n"})
    proposal = await _propose(
        client, label="student", old_text="Goal: algebra", new_text="Goal: geometry"
    )
    await client.put(BLOCK, json={"body": "Name: Ann B.\nGoal: algebra\n"})
    response = await client.post(f"/proposals/{proposal['id']}/approve")
    assert response.status_code == 200
    assert (await client.get(BLOCK)).json()["body"] == "Name: Ann B.\nGoal: geometry\n"


async def test_replace_edit_conflicts_when_text_is_gone(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "S", "body": "Goal: algebra\n"})
    proposal = await _propose(
        client, label="student", old_text="Goal: algebra", new_text="Goal: geometry"
    )
    await client.put(BLOCK, json={"body": "Goal: calculus\n"})
    response = await client.post(f"/proposals/{proposal['id']}/approve")
    assert response.status_code == 409
    assert (await client.get(BLOCK)).json()["body"] == "Goal: calculus\n"


async def test_replace_edit_that_does_not_apply_now_is_422(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "S", "body": "abc"})
    response = await client.post(
        "/users/u1/proposals",
        json={"label": "student", "reason": "r", "old_text": "zzz", "new_text": "y"},
    )
    assert response.status_code == 422
    assert "no longer" in response.json()["detail"]


async def test_approving_supersedes_older_whole_body_proposals(client: AsyncClient) -> None:
    await client.put(BLOCK, json={"title": "S", "body": "v1"})
    first = await _propose(client, label="student", body="first idea")
    second = await _propose(client, label="student", body="second idea")
    await client.post(f"/proposals/{second['id']}/approve")
    assert (await client.get(f"/proposals/{first['id']}")).json()["status"] == "superseded"


async def test_an_identical_pending_proposal_is_not_made_twice(harness: AppHarness) -> None:
    """Same author, same change, same block: while the first is pending, any run gets it back;
    once it is rejected, the agent may not propose it again (within the remembered window:
    test_rejections), a person may."""
    memory = harness.services.memory

    def draft(run_id: str, user_id: str = "u1", author: str = "agent:t") -> ProposalDraft:
        return ProposalDraft(
            user_id=user_id, label="student", reason="r", author=author, body="b", run_id=run_id
        )

    first, created_first = await memory.propose(draft("run-1"))
    again, created_again = await memory.propose(draft("run-1"))
    later_run, created_later = await memory.propose(draft("run-2"))
    assert created_first
    assert (created_again, created_later) == (False, False)
    assert again.id == later_run.id == first.id
    assert len(await memory.list_proposals("u1")) == 1
    # another author's identical change is its own proposal
    other_author, created_other_author = await memory.propose(draft("run-3", author="agent:x"))
    assert created_other_author
    assert other_author.id != first.id
    # the same edit for another user is that user's own proposal
    other_user, created_for_other_user = await memory.propose(draft("run-1", user_id="u2"))
    assert created_for_other_user
    assert [p.id for p in await memory.list_proposals("u2")] == [other_user.id]
    # rejected: the agent's same change is refused, a person's is a new proposal
    await memory.reject(first.id)
    with pytest.raises(AlreadyRejected):
        await memory.propose(draft("run-4"))
    anew, created_anew = await memory.propose(draft("run-4", author="api"))
    assert created_anew
    assert anew.id != first.id


async def test_append_proposals_add_a_line_at_the_end(harness: AppHarness) -> None:
    memory = harness.services.memory
    await memory.put_block("u1", "progress", title="P", body="day 1: fractions", author="api")
    proposal, _ = await memory.propose(
        ProposalDraft(
            user_id="u1", label="progress", reason="log", author="agent:t", append="day 2: ratios"
        )
    )
    assert (proposal.kind.value, proposal.new_text) == ("append", "day 2: ratios")
    assert "+day 2: ratios" in proposal.diff
    # another append lands first: an append still applies (to the block as it is then)
    other, _ = await memory.propose(
        ProposalDraft(
            user_id="u1", label="progress", reason="log", author="agent:t", append="day 2b: quiz"
        )
    )
    await memory.approve(other.id)
    await memory.approve(proposal.id)
    block = await memory.get_block("u1", "progress")
    assert block.body == "day 1: fractions\nday 2b: quiz\nday 2: ratios"
    # a new block can start with an append
    fresh, _ = await memory.propose(
        ProposalDraft(user_id="u1", label="log", reason="r", author="agent:t", append="first")
    )
    await memory.approve(fresh.id)
    assert (await memory.get_block("u1", "log")).body == "first"


async def test_concurrent_approvals_on_one_block_lose_no_update(harness: AppHarness) -> None:
    client = harness.client
    body = "".join(f"item {i}: todo\n" for i in range(6))
    await client.put(BLOCK, json={"title": "S", "body": body})
    ids = [
        (
            await _propose(
                client, label="student", old_text=f"item {i}: todo", new_text=f"item {i}: done"
            )
        )["id"]
        for i in range(6)
    ]
    results = await asyncio.gather(*[client.post(f"/proposals/{i}/approve") for i in ids])
    assert [r.status_code for r in results] == [200] * 6
    final = (await client.get(BLOCK)).json()
    assert final["body"] == "".join(f"item {i}: done\n" for i in range(6))
    assert final["version"] == 7
    history = (await client.get(f"{BLOCK}/history")).json()
    assert [v["version"] for v in history] == [7, 6, 5, 4, 3, 2, 1]
    decided = [await harness.services.memory.get_proposal(i) for i in ids]
    applied = sorted(p.applied_version or 0 for p in decided)
    assert applied == [2, 3, 4, 5, 6, 7]
    statuses = {p.status for p in await harness.services.memory.list_proposals("u1")}
    assert statuses == {ProposalStatus.APPROVED}


async def test_memory_context_is_rendered_in_label_order(harness: AppHarness) -> None:
    client = harness.client
    await client.put("/users/u1/blocks/progress", json={"title": "Progress", "body": "week 2"})
    await client.put(BLOCK, json={"title": "Student", "body": "Ann"})
    memory = harness.services.memory
    chosen = await memory.build_memory_context("u1", ["student", "progress", "missing"])
    assert chosen == (
        "## Student (`student`, version 1)\n\nAnn\n\n"
        "## Progress (`progress`, version 1)\n\nweek 2\n"
    )
    everything = await memory.build_memory_context("u1")
    assert everything.index("Progress") < everything.index("Student")
    assert await memory.build_memory_context("nobody") == ""


async def test_review_queue_lists_every_users_pending_proposals(
    client: AsyncClient, clock: FakeClock
) -> None:
    made: list[str] = []
    for user, run_id in (("u1", "run-a"), ("u2", "run-a"), ("u3", "run-b")):
        proposal = await client.post(
            f"/users/{user}/proposals",
            json={"label": "notes", "body": f"about {user}", "reason": "r", "run_id": run_id},
        )
        made.append(proposal.json()["id"])
        await clock.advance(1)
    await client.post(f"/proposals/{made[1]}/approve")

    pending = (await client.get("/proposals", params={"status": "pending"})).json()
    assert [p["id"] for p in pending] == [made[2], made[0]]  # newest first
    by_run = (await client.get("/proposals", params={"run_id": "run-a"})).json()
    assert {p["id"]: p["status"] for p in by_run} == {made[0]: "pending", made[1]: "approved"}
    assert len((await client.get("/proposals", params={"limit": 1})).json()) == 1
    assert (await client.get("/proposals", params={"status": "maybe"})).status_code == 422


async def test_bad_ids_labels_and_sizes_are_422(client: AsyncClient) -> None:
    for bad_user in ["a..b", "..x", "has space", "x" * 129, "semi;colon"]:
        response = await client.get(f"/users/{bad_user}/blocks")
        assert response.status_code == 422, bad_user
    assert (await client.get("/users/u1/blocks/Bad-Label")).status_code == 422
    assert (await client.put("/users/u1/blocks/" + "a" * 65, json={"body": "x"})).status_code == 422
    too_big = "é" * 40_000  # 80,000 bytes in UTF-8, over the 64 KiB default
    response = await client.put(BLOCK, json={"title": "S", "body": too_big})
    assert response.status_code == 422
    assert "65536" in response.json()["detail"]
    bad_label = await client.post(
        "/users/u1/proposals", json={"label": "NO", "reason": "r", "body": "x"}
    )
    assert bad_label.status_code == 422
    both = await client.post(
        "/users/u1/proposals",
        json={"label": "ok", "reason": "r", "body": "x", "old_text": "a", "new_text": "b"},
    )
    assert both.status_code == 422
    assert (await client.get("/proposals/nope")).status_code == 404
