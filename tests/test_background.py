"""Background tasks end to end: definitions, the executor's window, runs and their API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from ralph.app import create_app
from ralph.background.models import RunStatus, TaskDefinition, TriggerType, UserStatus
from ralph.composition import Services
from ralph.config import Settings
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import (
    Delay,
    Fail,
    ModelServer,
    call,
    scripted,
    text,
)
from tests.helpers import AppHarness, harness_for, using_model_server


@pytest.fixture
async def bg(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> AsyncIterator[AppHarness]:
    settings = using_model_server(settings, model_server, wait_max_seconds=30.0)
    async with harness_for(settings, clock, server=model_server) as harness:
        yield harness


# one attempt: a failure ends the user at once (retries: test_retries)
ONE_ATTEMPT = {"max_attempts": 1}


def task_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "test-progress-tracker",
        "system_prompt": "You are a background agent. Review the student context.",
        "tools": ["file_tools", "edit_memory_block", "read_memory_block"],
        "memory_blocks": ["student", "progress"],
        "trigger": {"type": "cron", "schedule": "*/5 * * * *"},
        "user_ids": ["test-user-1"],
        "batch_size": 5,
        "max_turns": 5,
    }
    body.update(overrides)
    return body


async def test_plan_manual_steps(bg: AppHarness) -> None:
    """The plan's curl steps: create the task, run it, list its runs."""
    client = bg.client
    await client.put("/users/test-user-1/blocks/student", json={"title": "S", "body": "Ann"})
    bg.server.responder = scripted(
        call("edit_memory_block", label="progress", body="week 1 reviewed", reason="review"),
        text("reviewed"),
    )
    created = await client.post("/background/tasks", json=task_body())
    assert created.status_code == 201, created.text
    assert created.json()["trigger"] == {
        "type": "cron",
        "schedule": "*/5 * * * *",
        "timezone": "UTC",
        "jitter_seconds": 0,
        "default_timezone": None,
    }
    listed = (await client.get("/background/tasks")).json()
    assert [t["name"] for t in listed] == ["test-progress-tracker"]

    started = await client.post("/background/tasks/test-progress-tracker/run")
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    await asyncio.wait_for(_finished(bg, run_id), 30)

    runs = (await client.get("/background/tasks/test-progress-tracker/runs")).json()
    assert [r["id"] for r in runs] == [run_id]
    run = runs[0]
    assert run["status"] == "success"
    assert run["trigger_type"] == "manual"
    assert run["rerun_of"] is None
    assert run["counts"] == {"success": 1}
    assert run["total_tokens"] == 30

    detail = (await client.get(f"/background/runs/{run_id}")).json()
    (user,) = detail["user_results"]
    assert user["user_id"] == "test-user-1"
    assert (user["turns_used"], user["tool_calls"], user["proposals_created"]) == (2, 1, 1)
    one = (await client.get(f"/background/runs/{run_id}/users/test-user-1")).json()
    tool_messages = [m for m in one["transcript"] if m["role"] == "tool"]
    assert "proposal_id" in tool_messages[0]["content"]
    # the memory context reached the agent
    assert "Ann" in bg.server.requests[0]["messages"][0]["content"]
    pending = (await client.get("/users/test-user-1/proposals?status=pending")).json()
    assert [(p["label"], p["author"], p["run_id"]) for p in pending] == [
        ("progress", "agent:test-progress-tracker", run_id)
    ]


async def _finished(bg: AppHarness, run_id: str) -> dict[str, Any]:
    await bg.services.coordinator.wait(run_id)
    body: dict[str, Any] = (await bg.client.get(f"/background/runs/{run_id}")).json()
    return body


async def test_wait_returns_the_finished_run(bg: AppHarness) -> None:
    await bg.client.post("/background/tasks", json=task_body(user_ids=["a", "b"]))
    response = await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    assert [u["user_id"] for u in body["user_results"]] == ["a", "b"]


async def test_concurrency_never_exceeds_batch_size(bg: AppHarness) -> None:
    users = [f"user-{i}" for i in range(12)]
    bg.server.responder = scripted(Delay(0.05, call("list_memory_blocks")), text("ok"))
    await bg.client.post(
        "/background/tasks",
        json=task_body(user_ids=users, batch_size=3, tools=["list_memory_blocks"]),
    )
    response = await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")
    body = response.json()
    assert body["status"] == "success"
    assert body["counts"] == {"success": 12}
    assert bg.server.max_in_flight == 3  # the window was full, and never over
    assert bg.server.calls == 24


async def test_slots_refill_as_they_free(bg: AppHarness) -> None:
    """One slow user must not hold the other slot idle (the plan's batch-by-batch flaw)."""
    slow_done = False
    fast_arrivals: list[bool] = []

    async def respond(request: dict[str, Any]) -> Any:
        nonlocal slow_done
        if "slow-user" in str(request["messages"]):
            await asyncio.sleep(1.0)
            slow_done = True
        else:
            fast_arrivals.append(slow_done)
        return text("ok")

    users = ["slow-user", *[f"fast-{i}" for i in range(10)]]
    for user in users:  # the memory context names the user, so the server can tell them apart
        await bg.client.put(f"/users/{user}/blocks/student", json={"body": user})
    bg.server.responder = respond
    await bg.client.post(
        "/background/tasks", json=task_body(user_ids=users, batch_size=2, tools=[])
    )
    body = (await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")).json()
    assert body["counts"] == {"success": 11}
    # every fast user was served while the slow one still held the other slot
    assert fast_arrivals == [False] * 10
    assert bg.server.max_in_flight == 2


async def test_partial_when_some_users_fail(bg: AppHarness) -> None:
    def respond(request: dict[str, Any]) -> Any:
        return Fail(500, "boom") if "bad-user" in str(request["messages"]) else text("ok")

    users = ["good-1", "bad-user", "good-2"]
    for user in users:
        await bg.client.put(f"/users/{user}/blocks/student", json={"body": user})
    bg.server.responder = respond
    body = task_body(user_ids=users, tools=[], retry=ONE_ATTEMPT)
    await bg.client.post("/background/tasks", json=body)
    body = (await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")).json()
    assert body["status"] == "partial"
    assert body["counts"] == {"success": 2, "failed": 1}
    failed = [u for u in body["user_results"] if u["status"] == "failed"]
    assert [u["user_id"] for u in failed] == ["bad-user"]
    assert failed[0]["error"]


async def test_all_failed_is_failed(bg: AppHarness) -> None:
    bg.server.responder = scripted(Fail(500, "down"))
    body = task_body(user_ids=["a", "b"], tools=[], retry=ONE_ATTEMPT)
    await bg.client.post("/background/tasks", json=body)
    body = (await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")).json()
    assert body["status"] == "failed"


async def test_subset_run(bg: AppHarness) -> None:
    await bg.client.post("/background/tasks", json=task_body(user_ids=["a", "b", "c"], tools=[]))
    response = await bg.client.post(
        "/background/tasks/test-progress-tracker/run?wait=true", json={"user_ids": ["c", "a"]}
    )
    body = response.json()
    assert [u["user_id"] for u in body["user_results"]] == ["c", "a"]
    outside = await bg.client.post(
        "/background/tasks/test-progress-tracker/run", json={"user_ids": ["zzz"]}
    )
    assert outside.status_code == 422
    assert "zzz" in outside.json()["detail"]


async def test_cancel_stops_running_and_pending_users(bg: AppHarness) -> None:
    bg.server.responder = scripted(Delay(30.0, text("never")))
    users = [f"u{i}" for i in range(6)]
    await bg.client.post(
        "/background/tasks", json=task_body(user_ids=users, batch_size=2, tools=[])
    )
    run_id = (await bg.client.post("/background/tasks/test-progress-tracker/run")).json()["run_id"]
    await bg.server.wait_for_in_flight(2)
    cancelled = await bg.client.post(f"/background/runs/{run_id}/cancel")
    assert cancelled.status_code == 200
    body = await asyncio.wait_for(_finished(bg, run_id), 10)
    assert body["status"] == "cancelled"
    assert body["counts"] == {"cancelled": 6}
    again = await bg.client.post(f"/background/runs/{run_id}/cancel")
    assert again.status_code == 409


async def test_a_unit_executes_at_most_once(bg: AppHarness) -> None:
    """A unit delivered twice (a queue redelivers) or after its user stopped being pending
    (cancelled while queued) runs no agent and leaves the user's row as it was."""
    services = bg.services
    await bg.client.post("/background/tasks", json=task_body(user_ids=["a", "b"], tools=[]))
    task = (await services.registry.get("test-progress-tracker")).definition
    run_id = await services.background.create_run(task, TriggerType.MANUAL)
    await services.units.run_user(run_id, task, "a")
    first = await services.runs.user(run_id, "a")
    assert (first.status, first.attempts, bg.server.calls) == (UserStatus.SUCCESS, 1, 1)
    await services.units.run_user(run_id, task, "a")
    assert await services.runs.user(run_id, "a") == first
    assert bg.server.calls == 1

    await services.runs.end_waiting_users(run_id, services.clock.now(), UserStatus.CANCELLED)
    await services.units.run_user(run_id, task, "b")
    b = await services.runs.user(run_id, "b")
    assert (b.status, b.started_at, b.attempts) == (UserStatus.CANCELLED, None, 0)
    assert bg.server.calls == 1


async def test_a_start_whose_commit_was_lost_is_recognised_on_retry(bg: AppHarness) -> None:
    """The connection broke after the claim committed: the retry (same start time) finds the
    user running since then with this run's lock, and runs it; a duplicate delivery does not.
    Before, the user stayed `running` with its lock held, and was skipped by every later run."""
    services = bg.services
    task = TaskDefinition.model_validate(task_body(user_ids=["a"], tools=[]))
    await services.registry.create(task)
    run_id = await services.background.create_run(task, TriggerType.MANUAL)
    now = services.clock.now()
    assert (await services.runs.start_user(run_id, task.name, "a", now)).started  # committed
    assert (await services.runs.start_user(run_id, task.name, "a", now, retry=True)).started
    assert not (await services.runs.start_user(run_id, task.name, "a", now)).started
    later = now + timedelta(microseconds=1)
    assert not (await services.runs.start_user(run_id, task.name, "a", later, retry=True)).started


async def test_same_user_is_never_run_twice_at_once(bg: AppHarness) -> None:
    gate = asyncio.Event()

    async def respond(request: dict[str, Any]) -> Any:
        await gate.wait()
        return text("ok")

    bg.server.responder = respond
    await bg.client.post("/background/tasks", json=task_body(user_ids=["a"], tools=[]))
    first = (await bg.client.post("/background/tasks/test-progress-tracker/run")).json()["run_id"]
    await bg.server.wait_for_in_flight(1)
    second = await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")
    body = second.json()
    skipped = body["user_results"][0]
    assert (skipped["status"], skipped["started_at"], skipped["attempts"]) == ("skipped", None, 0)
    assert first in skipped["error"]
    bg.server.responder = scripted(text("ok"))
    # the gate lives on the server's loop: release it from there
    assert bg.server.loop is not None
    bg.server.loop.call_soon_threadsafe(gate.set)
    done = await asyncio.wait_for(_finished(bg, first), 10)
    assert done["status"] == "success"


async def test_task_validation_errors(bg: AppHarness) -> None:
    client = bg.client
    cases = {
        "name": task_body(name="Bad Name"),
        "cron": task_body(trigger={"type": "cron", "schedule": "61 * * * *"}),
        "timezone": task_body(
            trigger={"type": "cron", "schedule": "0 3 * * *", "timezone": "Mars/Olympus"}
        ),
        "tool": task_body(tools=["rm_rf"]),
        "label": task_body(memory_blocks=["Not A Label"]),
        "user": task_body(user_ids=["a..b"]),
        "duplicate": task_body(user_ids=["a", "b", "a"]),
        "batch": task_body(batch_size=0),
        "turns": task_body(max_turns=101),
        "prompt": task_body(system_prompt="   "),
        "idle": task_body(trigger={"type": "idle", "idle_minutes": 0}),
        "trigger": task_body(trigger={"type": "sometimes"}),
    }
    for case, body in cases.items():
        response = await client.post("/background/tasks", json=body)
        assert response.status_code == 422, (case, response.text)
        assert response.json()["detail"], case
    assert (await client.get("/background/tasks")).json() == []


async def test_task_crud_status_codes(bg: AppHarness) -> None:
    client = bg.client
    assert (await client.get("/background/tasks/nope")).status_code == 404
    assert (await client.post("/background/tasks/nope/run")).status_code == 404
    assert (await client.post("/background/tasks/nope/enable")).status_code == 404
    assert (await client.delete("/background/tasks/nope")).status_code == 404
    assert (await client.get("/background/runs/nope")).status_code == 404
    assert (await client.post("/background/tasks", json=task_body())).status_code == 201
    assert (await client.post("/background/tasks", json=task_body())).status_code == 409

    replaced = await client.put(
        "/background/tasks/test-progress-tracker",
        json=task_body(trigger={"type": "idle", "idle_minutes": 30}, batch_size=9),
    )
    assert replaced.status_code == 200
    assert replaced.json()["trigger"] == {
        "type": "idle",
        "idle_minutes": 30,
        "cooldown_minutes": 60,
        "max_wait_minutes": None,
    }
    mismatch = await client.put("/background/tasks/other", json=task_body())
    assert mismatch.status_code == 422
    disabled = await client.post("/background/tasks/test-progress-tracker/disable")
    assert disabled.json()["enabled"] is False
    enabled = await client.post("/background/tasks/test-progress-tracker/enable")
    assert enabled.json()["enabled"] is True
    assert (await client.delete("/background/tasks/test-progress-tracker")).status_code == 200
    assert (await client.get("/background/tasks/test-progress-tracker")).status_code == 404


async def test_registry_sees_changes_made_by_another_replica(
    bg: AppHarness, clock: FakeClock
) -> None:
    from ralph.background.models import TaskDefinition
    from ralph.background.registry import TaskRegistry
    from ralph.background.task_store import TaskStore

    other = TaskRegistry(TaskStore(bg.services.engine), bg.services.clock)
    assert await other.list() == []
    await bg.client.post("/background/tasks", json=task_body(tools=[]))
    assert [t.definition.name for t in await other.list()] == ["test-progress-tracker"]
    await other.set_enabled("test-progress-tracker", False)
    mine = await bg.services.registry.get("test-progress-tracker")
    assert mine.definition.enabled is False
    assert isinstance(mine.definition, TaskDefinition)
    # a delete and a create that leave the count and the revisions as they were
    await bg.client.post("/background/tasks", json=task_body(name="first", tools=[]))
    assert {t.definition.name for t in await other.list()} == {"test-progress-tracker", "first"}
    await clock.advance(1)
    await bg.client.delete("/background/tasks/first")
    await bg.client.post("/background/tasks", json=task_body(name="second", tools=[]))
    assert {t.definition.name for t in await other.list()} == {"test-progress-tracker", "second"}
    # the same through a replica whose clock is an hour behind: its changes are not the newest
    behind = FakeClock(clock.now() - timedelta(hours=1))
    lagging = TaskRegistry(TaskStore(bg.services.engine), behind)
    await lagging.create(TaskDefinition.model_validate(task_body(name="third", tools=[])))
    assert len(await other.list()) == 3
    await lagging.delete("third")
    await lagging.create(TaskDefinition.model_validate(task_body(name="fourth", tools=[])))
    names = {t.definition.name for t in await other.list()}
    assert names == {"test-progress-tracker", "second", "fourth"}


async def test_shutdown_gives_grace_then_interrupts(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    settings = using_model_server(settings, model_server, shutdown_grace_seconds=0.2)
    model_server.responder = scripted(Delay(30.0, text("never")))
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        await services.registry.create(
            TaskDefinition.model_validate(
                task_body(user_ids=["a", "b", "c"], batch_size=2, tools=[])
            )
        )
        run_id = await services.background.create_run(
            (await services.registry.get("test-progress-tracker")).definition, TriggerType.MANUAL
        )
        services.coordinator.start(run_id)
        await model_server.wait_for_in_flight(2)
    # the lifespan has ended: the grace period passed, agents were cancelled
    async with app.router.lifespan_context(app):
        services = app.state.services
        run = await services.runs.get(run_id)
        assert run.status is RunStatus.INTERRUPTED
        assert run.counts == {"interrupted": 3}
        users = await services.runs.users(run_id)
        assert {u.error for u in users if u.started_at} == {"interrupted by shutdown"}
        # the interrupted users were queued in a pending run: recovery starts it once the
        # lease has passed (its creator might still be about to start it before that)
        model_server.responder = scripted(text("done"))
        assert (await services.scheduler.tick()).recovered == []
        await clock.advance(settings.run_lease_seconds + 1)
        [rerun_id] = (await services.scheduler.tick()).recovered
        await services.coordinator.drain()
        rerun = await services.runs.get(rerun_id)
        assert rerun.status is RunStatus.SUCCESS
        assert (rerun.trigger_type, rerun.rerun_of) == (TriggerType.RERUN, run_id)
        assert [u.user_id for u in await services.runs.users(rerun_id)] == ["a", "b", "c"]
        assert (await services.runs.get(run_id)).status is RunStatus.INTERRUPTED


async def test_runs_api_pages_and_filters(bg: AppHarness, clock: FakeClock) -> None:
    users = [f"u{i}" for i in range(5)]
    body = task_body(user_ids=users, tools=[], retry=ONE_ATTEMPT)
    await bg.client.post("/background/tasks", json=body)
    first = (await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")).json()
    await clock.advance(1)
    bg.server.responder = scripted(Fail(500, "down"))
    second = (await bg.client.post("/background/tasks/test-progress-tracker/run?wait=true")).json()
    assert (first["status"], second["status"]) == ("success", "failed")

    runs = (await bg.client.get("/background/tasks/test-progress-tracker/runs")).json()
    assert [r["id"] for r in runs] == [second["id"], first["id"]]  # newest first
    only_failed = await bg.client.get(
        "/background/tasks/test-progress-tracker/runs", params={"status": "failed"}
    )
    assert [r["id"] for r in only_failed.json()] == [second["id"]]
    limited = await bg.client.get("/background/tasks/test-progress-tracker/runs?limit=1")
    assert len(limited.json()) == 1

    page = (
        await bg.client.get(
            f"/background/runs/{first['id']}", params={"users_offset": 2, "users_limit": 2}
        )
    ).json()
    assert [u["user_id"] for u in page["user_results"]] == ["u2", "u3"]
    assert page["user_total"] == 5
    failed = (
        await bg.client.get(f"/background/runs/{second['id']}", params={"users_status": "failed"})
    ).json()
    assert len(failed["user_results"]) == 5

    run_url = f"/background/runs/{first['id']}"
    assert (await bg.client.get(f"{run_url}/users/nobody")).status_code == 404
    assert (await bg.client.get(f"{run_url}/users/a..b")).status_code == 422
    bad_status = await bg.client.get(
        "/background/tasks/test-progress-tracker/runs", params={"status": "sleeping"}
    )
    assert bad_status.status_code == 422
    assert (
        await bg.client.get("/background/tasks/test-progress-tracker/runs?limit=0")
    ).status_code == 422


def _prompt(request: dict[str, Any]) -> str:
    """The agent's input in a model request: its last user message."""
    users = [m for m in request["messages"] if m["role"] == "user"]
    return str(users[-1]["content"])


async def _fire(services: Services) -> list[str]:
    report = await services.scheduler.tick()
    await services.coordinator.drain()
    return report.started


async def test_an_idle_run_gets_the_messages_since_the_task_last_ran(
    bg: AppHarness, clock: FakeClock
) -> None:
    services = bg.services
    bg.server.responder = scripted(text("summarised"))
    body = task_body(
        name="summarise",
        tools=[],
        trigger={"type": "idle", "idle_minutes": 30, "cooldown_minutes": 0},
        user_ids=["a"],
    )
    assert (await bg.client.post("/background/tasks", json=body)).status_code == 201
    for content in ("first question", "second question"):
        await bg.client.post("/users/a/messages", json={"content": content})
        await clock.advance(1)
    await bg.client.post("/users/b/messages", json={"content": "someone else's"})
    await clock.advance(timedelta(minutes=30))
    [run_id] = await _fire(services)
    prompt = _prompt(bg.server.requests[-1])
    assert "(2, oldest first)" in prompt
    assert prompt.index("user: first question") < prompt.index("user: second question")
    assert "someone else's" not in prompt
    run = await services.background.run(run_id)
    assert run[0].trigger_type is TriggerType.IDLE

    await clock.advance(1)
    await bg.client.post("/users/a/messages", json={"content": "third question"})
    await clock.advance(timedelta(minutes=30))
    assert len(await _fire(services)) == 1
    prompt = _prompt(bg.server.requests[-1])
    assert "(1, oldest first)" in prompt
    assert "user: third question" in prompt
    assert "first question" not in prompt


async def test_other_runs_get_episode_messages_only_when_the_task_asks(
    bg: AppHarness, clock: FakeClock
) -> None:
    bg.server.responder = scripted(text("done"))
    for content in ("one", "two", "three"):
        await bg.client.post("/users/a/messages", json={"content": f"message {content}"})
        await clock.advance(1)
    plain = task_body(name="plain", tools=[], user_ids=["a"])
    asking = task_body(name="asking", tools=[], user_ids=["a"], episode_messages=2)
    for body in (plain, asking):
        assert (await bg.client.post("/background/tasks", json=body)).status_code == 201
    await bg.client.post("/background/tasks/plain/run?wait=true")
    assert "message" not in _prompt(bg.server.requests[-1])
    await bg.client.post("/background/tasks/asking/run?wait=true")
    prompt = _prompt(bg.server.requests[-1])
    assert "(2, oldest first)" in prompt
    assert "message one" not in prompt
    assert prompt.index("message two") < prompt.index("message three")
    # since it last ran: nothing new, nothing given
    await clock.advance(1)
    await bg.client.post("/background/tasks/asking/run?wait=true")
    assert "message" not in _prompt(bg.server.requests[-1])
    invalid = task_body(name="too-many", user_ids=["a"], episode_messages=501)
    assert (await bg.client.post("/background/tasks", json=invalid)).status_code == 422


async def test_a_dry_run_previews_proposals_and_changes_nothing(
    bg: AppHarness, clock: FakeClock
) -> None:
    client = bg.client
    await client.put("/users/a/blocks/progress", json={"title": "P", "body": "week 1"})
    await client.post("/users/a/messages", json={"content": "I finished unit 2"})
    await clock.advance(1)
    body = task_body(name="tryout", tools=["edit_memory_block"], user_ids=["a", "b"])
    assert (await client.post("/background/tasks", json={**body, "episode_messages": 5})).is_success
    bg.server.responder = scripted(
        call("edit_memory_block", label="progress", append="unit 2 done", reason="told me"),
        text("proposed"),
    )
    answer = await client.post(
        "/background/tasks/tryout/run?wait=true", json={"dry_run": True, "user_ids": ["a"]}
    )
    assert answer.status_code == 200, answer.text
    run = answer.json()
    assert (run["dry_run"], run["status"], run["user_total"]) == (True, "success", 1)
    assert "I finished unit 2" in _prompt(bg.server.requests[0])  # the agent saw its episode

    previews = (await client.get(f"/proposals?run_id={run['id']}")).json()
    assert [(p["status"], p["user_id"], p["label"]) for p in previews] == [
        ("preview", "a", "progress")
    ]
    assert "+unit 2 done" in previews[0]["diff"]
    assert (await client.get("/proposals?status=pending")).json() == []  # not in the queue
    for verb in ("approve", "reject"):
        refused = await client.post(f"/proposals/{previews[0]['id']}/{verb}", json={})
        assert refused.status_code == 409
        assert "preview from a dry run" in refused.text
    block = (await client.get("/users/a/blocks/progress")).json()
    assert (block["version"], block["body"]) == (1, "week 1")

    # the dry run does not count as the task having run: a real run gets the same episode,
    # and its proposal is a pending one (a preview never stands in for it)
    bg.server.requests.clear()
    real = await client.post("/background/tasks/tryout/run?wait=true", json={"user_ids": ["a"]})
    assert real.json()["dry_run"] is False
    assert "I finished unit 2" in _prompt(bg.server.requests[0])
    pending = (await client.get("/proposals?status=pending")).json()
    assert [(p["run_id"], p["status"]) for p in pending] == [(real.json()["id"], "pending")]


async def test_an_auto_approved_edit_is_not_applied_again_by_the_rerun(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> None:
    """`approval: auto`: the first call's append is applied at once, the second call is cut
    by a shutdown; the rerun's agent proposes the same append: the block holds it once (it
    held it twice)."""
    settings = using_model_server(settings, model_server, shutdown_grace_seconds=0.2)
    note = call("edit_memory_block", label="progress", append="unit 3 finished", reason="r")
    model_server.responder = scripted(note, Delay(30.0, text("never")))
    body = task_body(user_ids=["a", "b"], tools=["edit_memory_block"], approval="auto")
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        for user in ("a", "b"):
            await services.memory.put_block(
                user, "progress", title=None, body="day 1", author="api"
            )
        await services.registry.create(TaskDefinition.model_validate(body))
        task = (await services.registry.get("test-progress-tracker")).definition
        run_id = await services.background.create_run(task, TriggerType.MANUAL)
        services.coordinator.start(run_id)
        await model_server.wait_for_in_flight(2)
    async with app.router.lifespan_context(app):
        services = app.state.services
        assert (await services.runs.get(run_id)).counts == {"interrupted": 2}
        model_server.responder = scripted(note, text("done"))
        await clock.advance(settings.run_lease_seconds + 1)
        [rerun_id] = (await services.scheduler.tick()).recovered
        await services.coordinator.drain()
        assert (await services.runs.get(rerun_id)).counts == {"success": 2}
        for user in ("a", "b"):
            block = await services.memory.get_block(user, "progress")
            assert block.body.count("unit 3 finished") == 1, block.body


async def test_deleting_a_task_mid_run_cancels_the_run(
    settings: Settings, model_server: ModelServer
) -> None:
    """Its users end `cancelled` (20 of 20 went on and made proposals), and a task created
    again under the name lists none of the old task's runs."""
    settings = using_model_server(settings, model_server)
    model_server.responder = scripted(Delay(30.0, text("never")))
    users = [f"u{i}" for i in range(20)]
    async with harness_for(settings) as harness:
        client = harness.client
        body = task_body(user_ids=users, batch_size=2, tools=[])
        assert (await client.post("/background/tasks", json=body)).status_code == 201
        run_id = (await client.post("/background/tasks/test-progress-tracker/run")).json()["run_id"]
        await model_server.wait_for_in_flight(2)
        assert (await client.delete("/background/tasks/test-progress-tracker")).status_code == 200
        run = await harness.services.coordinator.wait(run_id, 10)
        assert run is not None
        assert run.status is RunStatus.CANCELLED
        assert run.counts == {"cancelled": 20}
        assert (await client.post("/background/tasks", json=body)).status_code == 201
        runs = await client.get("/background/tasks/test-progress-tracker/runs")
        assert runs.json() == []
        assert (await client.get(f"/background/runs/{run_id}")).status_code == 200
