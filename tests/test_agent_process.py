"""The default worker mode: a server's units run in its agent process (a child process), on the
real clock. The model is the scripted server; the database a SQLite file or MariaDB."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ralph.background.agent_process import AgentProcess
from ralph.background.models import RunStatus, TaskDefinition, TriggerType
from ralph.composition import Services
from ralph.config import Settings
from ralph.testing.model_server import Delay, ModelServer, call, scripted, text
from tests.helpers import AppHarness, execute_task, harness_for, using_model_server

pytestmark = pytest.mark.slow


def subprocess_settings(settings: Settings, server: ModelServer, **extra: object) -> Settings:
    return using_model_server(settings, server, worker_mode="subprocess", **extra)


def task(users: list[str], **overrides: Any) -> TaskDefinition:
    values: dict[str, Any] = {
        "name": "nightly",
        "system_prompt": "review",
        "tools": ["edit_memory_block"],
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": users,
        "batch_size": 2,
    }
    return TaskDefinition.model_validate(values | overrides)


def agent_process(services: Services) -> AgentProcess:
    dispatch = services.coordinator.dispatch
    assert isinstance(dispatch, AgentProcess)
    return dispatch


@asynccontextmanager
async def stuck_run(
    settings: Settings, model_server: ModelServer, **overrides: Any
) -> AsyncGenerator[tuple[AppHarness, str]]:
    """A server in the subprocess mode with a run of three users whose model calls hang,
    once two of them are in flight."""
    model_server.responder = scripted(Delay(30.0, text("never")))
    async with harness_for(subprocess_settings(settings, model_server)) as harness:
        await harness.services.registry.create(task(["a", "b", "c"], tools=[], **overrides))
        run_id, _ = await harness.services.background.run_now("nightly", None, None)
        await model_server.wait_for_in_flight(2)
        yield harness, run_id


async def test_units_run_in_the_agent_process(
    settings: Settings, model_server: ModelServer
) -> None:
    model_server.responder = scripted(
        call("edit_memory_block", label="notes", body="seen", reason="r"), text("done")
    )
    async with harness_for(subprocess_settings(settings, model_server)) as harness:
        services = harness.services
        users = ["a", "b", "c", "d", "e"]
        await services.registry.create(task(users))
        run = await execute_task(services, task(users))
        child = agent_process(services).pid
        assert child is not None
        assert child != os.getpid()
        assert run.status is RunStatus.SUCCESS, run
        assert run.counts == {"success": 5}
        for user in users:
            proposals = await services.memory.list_proposals(user)
            assert [(p.author, p.run_id) for p in proposals] == [("agent:nightly", run.id)]
        assert model_server.max_in_flight <= 2  # the server's window caps the child's agents
        # a second run reuses the same child
        again = await execute_task(services, task(users), TriggerType.MANUAL, ["a"])
        assert again.counts == {"success": 1}
        assert agent_process(services).pid == child


async def test_cancel_reaches_agents_in_the_agent_process(
    settings: Settings, model_server: ModelServer
) -> None:
    async with stuck_run(settings, model_server) as (harness, run_id):
        services = harness.services
        await services.background.cancel(run_id)
        run = await services.coordinator.wait(run_id, 10)
        assert run is not None
        assert run.status is RunStatus.CANCELLED
        assert run.counts == {"cancelled": 3}


async def test_shutdown_interrupts_the_agent_process_and_queues_a_rerun(
    settings: Settings, model_server: ModelServer
) -> None:
    settings = settings.model_copy(update={"shutdown_grace_seconds": 0.2})
    async with stuck_run(settings, model_server) as (harness, run_id):
        child = agent_process(harness.services)
    # the lifespan has ended: the child recorded its users and exited
    assert child.pid is None
    async with harness_for(settings) as harness:  # the test's settings: in process
        run, users = await harness.services.background.run(run_id)
        assert run.status is RunStatus.INTERRUPTED
        assert sorted((u.user_id, u.status.value) for u in users) == [
            ("a", "interrupted"),
            ("b", "interrupted"),
            ("c", "interrupted"),
        ]
        [rerun] = await harness.services.background.runs("nightly", RunStatus.PENDING, 10)
        assert rerun.rerun_of == run_id


async def test_a_killed_agent_process_is_replaced_and_its_units_retried(
    settings: Settings, model_server: ModelServer
) -> None:
    async with stuck_run(settings, model_server, retry={"backoff_seconds": 0}) as (harness, run_id):
        services = harness.services
        first = agent_process(services).pid
        assert first is not None
        model_server.responder = scripted(text("done"))
        os.kill(first, signal.SIGKILL)
        run = await services.coordinator.wait(run_id, 30)
        assert run is not None
        # the two in flight lose their attempt and are retried in a new child, as is the third
        assert run.counts == {"success": 3}, run.counts
        for user in ("a", "b"):
            lost, retried = await services.background.attempts(run_id, user)
            assert (lost.reason, retried.reason) == ("worker_lost", "finished")
            assert lost.error is not None
            assert "agent process exited" in lost.error
        assert agent_process(services).pid not in (None, first)


async def test_a_killed_agent_process_fails_its_units_without_retries(
    settings: Settings, model_server: ModelServer
) -> None:
    async with stuck_run(settings, model_server, retry={"max_attempts": 1}) as (harness, run_id):
        services = harness.services
        os.kill(agent_process(services).pid or 0, signal.SIGKILL)
        model_server.responder = scripted(text("done"))
        run = await services.coordinator.wait(run_id, 30)
        assert run is not None
        assert run.counts == {"failed": 2, "success": 1}, run.counts
        _, users = await services.background.run(run_id)
        failed = [u for u in users if u.status.value == "failed"]
        assert all(u.reason == "worker_lost" for u in failed)


async def test_named_reviewers_reach_the_agent_process(
    settings: Settings, model_server: ModelServer
) -> None:
    """Secrets nested in a setting (each named reviewer's token) reach the child whole: masked,
    two reviewers had one token ('**********') and the child refused to start."""
    model_server.responder = scripted(text("done"))
    reviewers = "alice:alice-token-0123456789,bob:bob-token-0123456789abc"
    configured = Settings.model_validate(
        {"api_token": "apitoken-0123456789abcdef", "reviewers": reviewers}
    )
    secured = subprocess_settings(
        settings,
        model_server,
        api_token=configured.api_token,
        reviewers=configured.reviewers,
    )
    async with harness_for(secured) as harness:
        await harness.services.registry.create(task(["a"], tools=[]))
        run = await execute_task(harness.services, task(["a"], tools=[]))
        assert run.status is RunStatus.SUCCESS, run


async def test_the_working_directory_is_not_on_the_agent_process_path(
    settings: Settings, model_server: ModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module in the directory the server runs from is not imported by the child in place
    of a library of the same name (`limits.py` broke every run)."""
    (tmp_path / "limits.py").write_text("raise SystemExit('the wrong limits')\n")
    monkeypatch.chdir(tmp_path)
    model_server.responder = scripted(text("done"))
    async with harness_for(subprocess_settings(settings, model_server)) as harness:
        await harness.services.registry.create(task(["a"], tools=[]))
        run = await execute_task(harness.services, task(["a"], tools=[]))
        assert run.status is RunStatus.SUCCESS, run


async def test_extract_mode_in_the_agent_process(
    settings: Settings, model_server: ModelServer
) -> None:
    """The extract mode runs wherever units run: here in the agent process."""
    edit = {"label": "notes", "action": "append", "old_text": "", "text": "Has an exam."}
    reply = {"new_facts": True, "edits": [{**edit, "reason": "r"}]}
    model_server.responder = scripted(text(json.dumps(reply)))
    async with harness_for(subprocess_settings(settings, model_server)) as harness:
        services = harness.services
        definition = task(["a"], tools=[], mode="extract", memory_blocks=["notes"])
        await services.registry.create(definition)
        run = await execute_task(services, definition)
        assert run.counts == {"success": 1}, run
        [proposal] = await services.memory.list_proposals("a")
        assert proposal.new_text == "Has an exam."
