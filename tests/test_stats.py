"""A task's quality at a glance: `GET /background/tasks/{name}/stats` counts what its runs
and its agents' proposals came to, per day and per block, as the runs recorded them. On the
injected clock, with the scripted model, on SQLite and MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.config import Settings
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import Fail, ModelServer, call, text
from tests.helpers import AppHarness, harness_for, notes_task, using_model_server

DAY1 = datetime(2026, 3, 1, 3, tzinfo=UTC)


def agent(request: dict[str, Any]) -> Any:
    """Proposes a note and a goal for every user but `u4`, whose provider fails."""
    system = str(request["messages"][0]["content"])
    if "u4's" in system:
        return Fail(500, "down")
    turns = sum(1 for m in request["messages"] if m["role"] == "assistant")
    if turns == 0:
        return call("edit_memory_block", label="notes", append="likes chess", reason="said")
    if turns == 1:
        return call("edit_memory_block", label="goals", append="a marathon", reason="said")
    return text("done")


@pytest.fixture
async def app(settings: Settings, clock: FakeClock) -> AsyncIterator[AppHarness]:
    with ModelServer(agent) as server:
        async with harness_for(using_model_server(settings, server), clock) as harness:
            yield harness


async def run(client: AsyncClient) -> dict[str, Any]:
    answer = await client.post("/background/tasks/nightly/run?wait=true")
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_stats_count_the_runs_and_the_reviewers_decisions(
    app: AppHarness, clock: FakeClock
) -> None:
    client = app.client
    await clock.set(DAY1)
    users = ["u1", "u2", "u3", "u4"]
    for user in users:
        await client.put(f"/users/{user}/blocks/notes", json={"body": f"{user}'s notes"})
    task = notes_task(user_ids=users, retry={"max_attempts": 1}, batch_size=4)
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    first = await run(client)
    assert first["counts"] == {"success": 3, "failed": 1}, first
    made = (await client.get(f"/proposals?run_id={first['id']}")).json()
    notes = {p["user_id"]: p["id"] for p in made if p["label"] == "notes"}
    approve = f"/proposals/{notes['u1']}/approve"
    assert (await client.post(approve)).status_code == 200
    edited = await client.post(f"/proposals/{notes['u2']}/approve", json={"append": "chess"})
    assert edited.status_code == 200
    assert (await client.post(f"/proposals/{notes['u3']}/reject")).status_code == 200
    # a dry run counts nothing
    dry = await client.post("/background/tasks/nightly/run?wait=true", json={"dry_run": True})
    assert dry.status_code == 200, dry.text

    await clock.advance(timedelta(days=1))
    second = await run(client)
    assert second["counts"] == {"success": 3, "failed": 1}

    answer = await client.get("/background/tasks/nightly/stats?days=3")
    assert answer.status_code == 200, answer.text
    stats = answer.json()
    assert [d["day"] for d in stats["per_day"]] == ["2026-03-01", "2026-03-02"]
    day1, day2 = stats["per_day"]
    assert day1["users"] == {"success": 3, "failed": 1}
    # the goals wait for review (day 2's agents proposed them again: the same proposals)
    assert day1["proposals"] == {
        "approved": 1,
        "approved_with_edits": 1,
        "rejected": 1,
        "superseded": 0,
        "expired": 0,
        "conflict": 0,
        "pending": 3,
    }
    assert day1["approval_rate"] == round(2 / 3, 4)
    assert day1["total_tokens"] == first["total_tokens"]
    # u1's note is in the block, u3's was rejected: only u2's (edited) note is new
    assert sum(day2["proposals"].values()) == day2["proposals"]["pending"] == 1
    assert day2["approval_rate"] is None
    assert stats["total_tokens"] == first["total_tokens"] + second["total_tokens"]
    assert stats["approval_rate"] == round(2 / 3, 4)
    by_label = {s["label"]: s for s in stats["per_label"]}
    assert by_label["notes"]["proposals"]["rejected"] == 1
    assert by_label["goals"]["proposals"]["pending"] == 3
    assert by_label["goals"]["approval_rate"] is None

    assert (await client.get("/background/tasks/nope/stats")).status_code == 404
    assert (await client.get("/background/tasks/nightly/stats?days=0")).status_code == 422

    # the console draws them on the server: charts readable without JavaScript
    page = await client.get("/console/tasks/nightly?days=3")
    assert page.status_code == 200, page.text
    assert page.text.count('<svg class="chart"') == 2
    assert "<title>2026-03-01: 1 rejected</title>" in page.text
    assert "67%</strong> approved of the decided" in page.text
    listed = await client.get("/console/tasks")
    assert "67% <span" in listed.text
    assert (await client.get("/console/tasks/nope")).status_code == 404
