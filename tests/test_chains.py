"""Per-user task chains: a task with an `after` trigger runs for a user once the task it
follows has ended for them (with a status in its `on`), once per (upstream run, user), with
the upstream outcome in its agent's input. On the injected clock, against the scripted model
server, on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from httpx import AsyncClient
from sqlalchemy import update

from ralph.background.models import TaskRun, TriggerType
from ralph.composition import Services
from ralph.config import Settings
from ralph.db.tables import task_run_users
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import Action, Fail, ModelServer, call, text
from tests.helpers import AppHarness, harness_for, using_model_server

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
USERS = ["u1", "u2", "u3"]


class Agents:
    """A model that answers each task's agent by the user it works for (read from the memory
    in its instructions), failing for the users in `failing`, and keeps what each was told."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.told: dict[tuple[str, str], str] = {}
        self.order: list[tuple[str, str]] = []

    def __call__(self, request: dict[str, Any]) -> Action:
        system = str(request["messages"][0]["content"])
        user = re.search(r"notes of (u\d+)", system)
        task = re.search(r"you are the (\w+) agent", system)
        assert user is not None, system
        assert task is not None, system
        key = (task.group(1), user.group(1))
        self.told[key] = system
        self.order.append(key)
        if key[1] in self.failing and key[0] == "summarise":
            return Fail(500, "provider down")
        if key[0] == "noter" and len(request["messages"]) < 3:
            return call("edit_memory_block", label="notes", append="likes chess", reason="A said")
        return text(f"{key[0]} says: {key[1]} likes chess")


@pytest.fixture
def agents() -> Agents:
    return Agents()


@pytest.fixture
async def app(settings: Settings, clock: FakeClock, agents: Agents) -> AsyncIterator[AppHarness]:
    with ModelServer(agents) as server:
        async with harness_for(
            using_model_server(settings, server), clock, server=server
        ) as harness:
            await clock.set(NOW)
            for user in USERS:
                answer = await harness.client.put(
                    f"/users/{user}/blocks/notes",
                    json={"body": f"notes of {user}", "author": "api"},
                )
                assert answer.status_code == 200, answer.text
            yield harness


def task(name: str, trigger: dict[str, Any], users: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "system_prompt": f"you are the {name} agent",
        "tools": [],
        "trigger": trigger,
        "user_ids": users or USERS,
        "retry": {"max_attempts": 1},
    }


NEVER = {"type": "cron", "schedule": "0 3 1 1 *"}
FOLLOWS_A = {"type": "after", "task": "summarise"}


A_THEN_B = (task("summarise", NEVER), task("progress", FOLLOWS_A))


async def create(client: AsyncClient, *tasks: dict[str, Any]) -> None:
    for body in tasks:
        answer = await client.post("/background/tasks", json=body)
        assert answer.status_code == 201, answer.text


async def run_now(services: Services, name: str, *, dry_run: bool = False) -> TaskRun:
    stored = await services.registry.get(name)
    run_id = await services.background.create_run(
        stored.definition, TriggerType.MANUAL, dry_run=dry_run
    )
    return await services.coordinator.execute(run_id)


async def after_runs(client: AsyncClient, name: str) -> list[dict[str, Any]]:
    answer = await client.get(f"/background/tasks/{name}/runs")
    assert answer.status_code == 200, answer.text
    return [r for r in answer.json() if r["trigger_type"] == "after"]


async def users_of(client: AsyncClient, run_id: str) -> dict[str, str]:
    body = (await client.get(f"/background/runs/{run_id}")).json()
    return {u["user_id"]: u["status"] for u in body["user_results"]}


async def test_b_runs_once_for_each_user_whose_a_succeeded_with_as_answer(
    app: AppHarness, clock: FakeClock, agents: Agents
) -> None:
    client, services = app.client, app.services
    await create(client, *A_THEN_B)
    agents.failing = {"u2"}
    upstream = await run_now(services, "summarise")
    assert upstream.counts == {"success": 2, "failed": 1}
    # results ending close together wait one batch window, then share one run
    report = await services.scheduler.tick()
    assert report.started == []
    assert report.next_wake == NOW + timedelta(seconds=1)
    await clock.advance(timedelta(seconds=1))
    [run_id] = (await services.scheduler.tick()).started
    await services.coordinator.drain()
    assert await users_of(client, run_id) == {"u1": "success", "u3": "success"}
    body = (await client.get(f"/background/runs/{run_id}")).json()
    assert (body["trigger_type"], body["upstream_run_ids"]) == ("after", [upstream.id])
    # B's agent was told what A answered for its user, and for no other user
    told = agents.told[("progress", "u1")]
    assert "summarise says: u1 likes chess" in told
    assert "u3 likes chess" not in told
    assert f"run {upstream.id}, success" in told
    # once: later passes find nothing to follow
    await clock.advance(timedelta(minutes=5))
    assert (await services.scheduler.tick()).started == []
    assert len(await after_runs(client, "progress")) == 1
    upcoming = (await client.get("/background/tasks/progress/upcoming")).json()
    assert (upcoming["follows"], upcoming["waiting_users"]) == ("summarise", 0)


async def test_on_and_delay_choose_which_results_start_b_and_when(
    app: AppHarness, clock: FakeClock, agents: Agents
) -> None:
    client, services = app.client, app.services
    await create(
        client,
        task("summarise", NEVER),
        task(
            "followup",
            {"type": "after", "task": "summarise", "on": ["failed"], "delay_seconds": 600},
        ),
    )
    agents.failing = {"u2"}
    await run_now(services, "summarise")
    upcoming = (await client.get("/background/tasks/followup/upcoming")).json()
    assert upcoming["waiting_users"] == 1
    assert upcoming["next_due_at"] == "2026-01-01T12:10:00Z"
    await clock.advance(timedelta(seconds=600))
    assert (await services.scheduler.tick()).started == []
    await clock.advance(timedelta(seconds=1))
    [run_id] = (await services.scheduler.tick()).started
    await services.coordinator.drain()
    assert await users_of(client, run_id) == {"u2": "success"}


async def test_two_replicas_follow_each_result_once(
    app: AppHarness, clock: FakeClock, second_replica: Services
) -> None:
    client, services = app.client, app.services
    await create(client, *A_THEN_B)
    await run_now(services, "summarise")
    await clock.advance(timedelta(seconds=1))
    reports = await asyncio.gather(services.scheduler.tick(), second_replica.scheduler.tick())
    started = [run_id for report in reports for run_id in report.started]
    await services.coordinator.drain()
    await second_replica.coordinator.drain()
    runs = await after_runs(client, "progress")
    assert [r["id"] for r in runs] == started
    [run] = runs
    assert await users_of(client, run["id"]) == dict.fromkeys(USERS, "success")


async def test_a_restart_between_as_result_and_bs_start_loses_nothing(
    settings: Settings, clock: FakeClock, agents: Agents
) -> None:
    with ModelServer(agents) as server:
        configured = using_model_server(settings, server)
        async with harness_for(configured, clock, server=server) as first:
            await clock.set(NOW)
            for user in USERS:
                await first.client.put(
                    f"/users/{user}/blocks/notes", json={"body": f"notes of {user}"}
                )
            await create(
                first.client,
                task("summarise", NEVER),
                task("progress", FOLLOWS_A),
            )
            await run_now(first.services, "summarise")
            # the server stops before any scheduler pass followed the results
        await clock.advance(timedelta(minutes=3))
        async with harness_for(configured, clock, server=server) as second:
            [run_id] = (await second.services.scheduler.tick()).started
            await second.services.coordinator.drain()
            assert await users_of(second.client, run_id) == dict.fromkeys(USERS, "success")
            assert (await second.services.scheduler.tick()).started == []


async def test_a_dry_run_of_a_starts_nothing(app: AppHarness, clock: FakeClock) -> None:
    client, services = app.client, app.services
    await create(client, *A_THEN_B)
    await run_now(services, "summarise", dry_run=True)
    await clock.advance(timedelta(seconds=5))
    assert (await services.scheduler.tick()).started == []
    assert await after_runs(client, "progress") == []


async def test_disabled_tasks_follow_nothing(app: AppHarness, clock: FakeClock) -> None:
    client, services = app.client, app.services
    await create(client, *A_THEN_B)
    # B disabled: A's results meanwhile are ignored, also once B is enabled again
    assert (await client.post("/background/tasks/progress/disable")).status_code == 200
    await run_now(services, "summarise")
    await clock.advance(timedelta(seconds=5))
    assert (await services.scheduler.tick()).started == []
    assert (await client.post("/background/tasks/progress/enable")).status_code == 200
    await clock.advance(timedelta(seconds=5))
    assert (await services.scheduler.tick()).started == []
    # A disabled: its (manual) results are not followed
    assert (await client.post("/background/tasks/summarise/disable")).status_code == 200
    await run_now(services, "summarise")
    await clock.advance(timedelta(seconds=5))
    assert (await services.scheduler.tick()).started == []
    assert await after_runs(client, "progress") == []


async def test_a_chain_of_three_runs_in_order_for_each_user(
    app: AppHarness, clock: FakeClock, agents: Agents
) -> None:
    client, services = app.client, app.services
    await create(
        client,
        task("summarise", NEVER),
        task("progress", FOLLOWS_A),
        task("plan", {"type": "after", "task": "progress"}),
    )
    await run_now(services, "summarise")
    for _ in range(2):
        await clock.advance(timedelta(seconds=1))
        assert len((await services.scheduler.tick()).started) == 1
        await services.coordinator.drain()
    for user in USERS:
        steps = [t for t, u in agents.order if u == user]
        assert steps == ["summarise", "progress", "plan"], steps
    # each step's agent saw the step before it
    assert "progress says: u2 likes chess" in agents.told[("plan", "u2")]


async def test_chains_are_checked(app: AppHarness) -> None:
    client = app.client
    unknown = await client.post(
        "/background/tasks", json=task("progress", {"type": "after", "task": "nope"})
    )
    assert unknown.status_code == 422
    assert "follows task 'nope', which does not exist" in unknown.text
    await create(client, *A_THEN_B)
    cycle = await client.put(
        "/background/tasks/summarise", json=task("summarise", {"type": "after", "task": "progress"})
    )
    assert cycle.status_code == 422
    assert "cycle: summarise after progress after summarise" in cycle.text
    itself = await client.post(
        "/background/tasks", json=task("loop", {"type": "after", "task": "loop"})
    )
    assert itself.status_code == 422, itself.text
    for i in range(3):
        before = "progress" if i == 0 else f"step{i - 1}"
        await create(client, task(f"step{i}", {"type": "after", "task": before}))
    too_long = await client.post(
        "/background/tasks", json=task("step3", {"type": "after", "task": "step2"})
    )
    assert too_long.status_code == 422
    assert "at most 5" in too_long.text
    followed = await client.delete("/background/tasks/summarise")
    assert followed.status_code == 409
    assert "'progress'" in followed.text
    bad_on = await client.post(
        "/background/tasks",
        json=task("x", {"type": "after", "task": "summarise", "on": ["retrying"]}),
    )
    assert bad_on.status_code == 422


async def test_a_tasks_file_is_checked_and_written_whole(app: AppHarness) -> None:
    client = app.client
    # B before A in the file: written A first
    file = [
        task("progress", FOLLOWS_A),
        task("summarise", NEVER),
    ]
    applied = await client.post("/background/tasks/apply", json={"tasks": file})
    assert applied.status_code == 200, applied.text
    cycle = [
        task("progress", FOLLOWS_A),
        task("summarise", {"type": "after", "task": "progress"}),
    ]
    refused = await client.post("/background/tasks/apply", json={"tasks": cycle})
    assert refused.status_code == 422
    assert "cycle" in refused.text
    # pruning a chain deletes the follower first
    pruned = await client.post("/background/tasks/apply", json={"tasks": [], "prune": True})
    assert pruned.status_code == 200, pruned.text
    assert (await client.get("/background/tasks")).json() == []


async def test_b_starts_within_its_delay_and_two_seconds_of_as_result_on_a_real_clock(
    settings: Settings, agents: Agents
) -> None:
    """The running scheduler (real time) hears of A's unit ends and starts B for each user
    between `delay_seconds` and `delay_seconds` + 2 s after that user's A result."""
    with ModelServer(agents) as server:
        configured = using_model_server(settings, server, scheduler_enabled=True)
        async with harness_for(configured, server=server) as app:
            client = app.client
            for user in USERS:
                await client.put(f"/users/{user}/blocks/notes", json={"body": f"notes of {user}"})
            await create(
                client,
                task("summarise", NEVER),
                task("progress", {"type": "after", "task": "summarise", "delay_seconds": 1}),
            )
            upstream_id, finished = await app.services.background.run_now(
                "summarise", None, wait_seconds=30
            )
            assert finished is not None
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                runs = await after_runs(client, "progress")
                if runs and runs[0]["status"] == "success":
                    break
                assert asyncio.get_running_loop().time() < deadline, runs
                await asyncio.sleep(0.05)
            upstream = (await client.get(f"/background/runs/{upstream_id}")).json()
            ended = {
                u["user_id"]: datetime.fromisoformat(u["completed_at"])
                for u in upstream["user_results"]
            }
            followed = (await client.get(f"/background/runs/{runs[0]['id']}")).json()
            for result in followed["user_results"]:
                lag = datetime.fromisoformat(result["started_at"]) - ended[result["user_id"]]
                assert timedelta(seconds=1) <= lag <= timedelta(seconds=3), lag


async def test_the_console_shows_the_chain(app: AppHarness) -> None:
    client = app.client
    await create(
        client,
        task("summarise", NEVER),
        task("progress", {"type": "after", "task": "summarise", "delay_seconds": 60}),
    )
    page = await client.get("/console/tasks")
    assert page.status_code == 200, page.text
    assert "after summarise +60s" in page.text
    assert "then progress" in page.text
    assert "0 users waiting" in page.text


async def test_bs_proposals_cite_as_run(app: AppHarness, clock: FakeClock) -> None:
    client, services = app.client, app.services
    noter = task("noter", {"type": "after", "task": "summarise"}, ["u1"])
    await create(client, task("summarise", NEVER, ["u1"]), noter | {"tools": ["edit_memory_block"]})
    upstream = await run_now(services, "summarise")
    await clock.advance(timedelta(seconds=1))
    [run_id] = (await services.scheduler.tick()).started
    await services.coordinator.drain()
    (proposal,) = (await client.get(f"/proposals?run_id={run_id}")).json()
    assert proposal["evidence"]["upstream_runs"] == [upstream.id]


async def test_runs_of_b_are_a_batch_window_apart(app: AppHarness, clock: FakeClock) -> None:
    """A result that becomes visible late (its unit's transaction committed after a pass)
    waits for the window after the last run of B instead of making a run of its own at once."""
    client, services = app.client, app.services
    await create(client, *A_THEN_B)
    await run_now(services, "summarise")  # every user, at NOW
    await clock.advance(timedelta(seconds=1))
    assert len((await services.scheduler.tick()).started) == 1
    await services.coordinator.drain()
    await clock.advance(timedelta(milliseconds=100))
    late = await run_now(services, "summarise")
    async with services.engine.begin() as conn:
        await conn.execute(
            update(task_run_users)
            .where(task_run_users.c.run_id == late.id)
            .values(completed_at=NOW + timedelta(milliseconds=200))
        )
    await clock.advance(timedelta(milliseconds=200))  # NOW + 1.3 s
    report = await services.scheduler.tick()
    assert report.started == []
    assert report.next_wake == NOW + timedelta(seconds=2)
    await clock.set(NOW + timedelta(seconds=2))
    assert len((await services.scheduler.tick()).started) == 1
