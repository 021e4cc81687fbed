"""Failure is a state: a user whose attempt failed for a transient reason is tried again in
the same run, at its backoff's time (or the provider's Retry-After), up to the task's
`max_attempts`; the rest end at once. On the injected clock, against the scripted model
server, on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from httpx import AsyncClient
from prometheus_client import REGISTRY

from ralph.background.models import (
    NO_RETRIES,
    NextState,
    RetryPolicy,
    TaskDefinition,
    UserStatus,
    next_state,
)
from ralph.config import Settings
from ralph.reasons import EndReason
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import Action, Fail, ModelServer, call, text
from tests.helpers import AppHarness, harness_for, notes_task, using_model_server

NOW = datetime(2026, 1, 1, tzinfo=UTC)
NO_JITTER = RetryPolicy(jitter=False)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def stamp(when: datetime, seconds: float = 0) -> str:
    """`when` plus `seconds` as the API writes times."""
    return (when + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


# (reason, proposals made, attempts so far, policy, retry_after) -> next state
CASES: list[tuple[EndReason, int, int, RetryPolicy, float | None, NextState]] = [
    (EndReason.FINISHED, 0, 1, NO_JITTER, None, NextState(UserStatus.SUCCESS)),
    # the defaults: 30 s, doubling, three attempts
    (EndReason.PROVIDER_ERROR, 0, 1, NO_JITTER, None, NextState(UserStatus.RETRYING, at(30))),
    (EndReason.PROVIDER_ERROR, 0, 2, NO_JITTER, None, NextState(UserStatus.RETRYING, at(60))),
    (EndReason.PROVIDER_ERROR, 0, 3, NO_JITTER, None, NextState(UserStatus.FAILED)),
    (EndReason.RATE_LIMITED, 0, 1, NO_JITTER, 120.0, NextState(UserStatus.RETRYING, at(120))),
    (EndReason.RATE_LIMITED, 0, 1, NO_JITTER, 5.0, NextState(UserStatus.RETRYING, at(30))),
    (EndReason.TIMEOUT, 0, 1, NO_JITTER, None, NextState(UserStatus.RETRYING, at(30))),
    (EndReason.INVALID_REPLY, 0, 2, NO_JITTER, None, NextState(UserStatus.RETRYING, at(60))),
    (EndReason.WORKER_LOST, 0, 1, NO_JITTER, None, NextState(UserStatus.RETRYING, at(30))),
    # a shutdown or a crash: due again at once
    (EndReason.INTERRUPTED, 0, 1, NO_JITTER, None, NextState(UserStatus.RETRYING, at(0))),
    (EndReason.INTERRUPTED, 0, 3, NO_JITTER, None, NextState(UserStatus.INTERRUPTED)),
    # stopped after proposing: its work is kept, not redone
    (EndReason.TIMEOUT, 2, 1, NO_JITTER, None, NextState(UserStatus.SUCCESS)),
    (EndReason.MAX_TURNS, 1, 1, NO_JITTER, None, NextState(UserStatus.SUCCESS)),
    # never retried
    (EndReason.MAX_TURNS, 0, 1, NO_JITTER, None, NextState(UserStatus.FAILED)),
    (EndReason.REPEATING, 0, 1, NO_JITTER, None, NextState(UserStatus.FAILED)),
    (EndReason.BUDGET_EXCEEDED, 0, 1, NO_JITTER, None, NextState(UserStatus.BUDGET_EXCEEDED)),
    (EndReason.CANCELLED, 0, 1, NO_JITTER, None, NextState(UserStatus.CANCELLED)),
    (EndReason.INTERNAL, 0, 1, NO_JITTER, None, NextState(UserStatus.FAILED)),
    (EndReason.PROVIDER_ERROR, 0, 1, NO_RETRIES, None, NextState(UserStatus.FAILED)),
    # the policy's own numbers, capped
    (
        EndReason.PROVIDER_ERROR,
        0,
        4,
        RetryPolicy(max_attempts=9, backoff_seconds=10, backoff_factor=3, jitter=False),
        None,
        NextState(UserStatus.RETRYING, at(270)),
    ),
    (
        EndReason.PROVIDER_ERROR,
        0,
        8,
        RetryPolicy(max_attempts=9, backoff_seconds=10, backoff_factor=3, jitter=False),
        None,
        NextState(UserStatus.RETRYING, at(900)),
    ),
    (
        EndReason.TIMEOUT,
        0,
        1,
        RetryPolicy(on=[EndReason.PROVIDER_ERROR], jitter=False),
        None,
        NextState(UserStatus.FAILED),
    ),
]


@pytest.mark.parametrize(("reason", "proposals", "attempts", "policy", "after", "expected"), CASES)
def test_the_next_state_is_a_function_of_reason_attempts_and_policy(
    reason: EndReason,
    proposals: int,
    attempts: int,
    policy: RetryPolicy,
    after: float | None,
    expected: NextState,
) -> None:
    assert (
        next_state(
            reason,
            proposals=proposals,
            attempts=attempts,
            policy=policy,
            now=NOW,
            retry_after=after,
        )
        == expected
    )


def test_jitter_spreads_a_delay_over_its_upper_half() -> None:
    policy = RetryPolicy()
    assert policy.delay(1, 0.0) == 15
    assert 15 < policy.delay(1, 0.5) < 30
    assert policy.delay(1, 0.999) < 30


def test_a_policy_refuses_reasons_that_are_never_retried() -> None:
    with pytest.raises(ValueError, match="budget_exceeded, max_turns cannot be retried"):
        RetryPolicy.model_validate({"on": ["max_turns", "budget_exceeded"]})
    assert RetryPolicy.model_validate({"on": ["timeout"]}).on == [EndReason.TIMEOUT]


# --- through a run -----------------------------------------------------------------------


class Provider:
    """A model provider that is down (HTTP 500), limiting (429 with a Retry-After) or up."""

    def __init__(self) -> None:
        self.state = "down"
        self.requests = 0
        self.retry_after = "120"

    def __call__(self, request: dict[str, Any]) -> Action:
        self.requests += 1
        if self.state == "one call, then down":
            self.state = "down"
            return call("read_memory_block", label="notes")
        if self.state == "down":
            return Fail(500, "provider down")
        if self.state == "limiting":
            return Fail(429, "slow down", headers={"retry-after": self.retry_after})
        if self.state == "looping":
            return call("read_memory_block", label="notes")
        return text("done")


@pytest.fixture
def provider() -> Provider:
    return Provider()


@pytest.fixture
async def app(
    settings: Settings, clock: FakeClock, provider: Provider
) -> AsyncIterator[AppHarness]:
    with ModelServer(provider) as server:
        async with harness_for(
            using_model_server(settings, server), clock, server=server
        ) as harness:
            yield harness


async def until(condition: Callable[[], Any], seconds: float = 20.0) -> Any:
    """Poll an async `condition` (in real time, while the app's run goes on) until truthy."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        value = await condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def user(client: AsyncClient, run_id: str, user_id: str = "u1") -> dict[str, Any]:
    response = await client.get(f"/background/runs/{run_id}/users/{user_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def start(client: AsyncClient, **task: Any) -> str:
    body = notes_task(name="retrying", tools=["read_memory_block"], **task)
    assert (await client.post("/background/tasks", json=body)).status_code == 201, body
    response = await client.post("/background/tasks/retrying/run")
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


async def in_status(client: AsyncClient, run_id: str, status: str, attempts: int) -> Any:
    async def reached() -> dict[str, Any] | None:
        found = await user(client, run_id)
        return found if (found["status"], found["attempts"]) == (status, attempts) else None

    return await until(reached)


async def run_status(client: AsyncClient, run_id: str) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        run = (await client.get(f"/background/runs/{run_id}")).json()
        return run if run["status"] not in ("pending", "running") else None

    return await until(finished)


def retries() -> float:
    """`ralph_unit_retries_total` of the task "retrying" for provider errors, so far."""
    labels = {"task": "retrying", "reason": "provider_error"}
    return REGISTRY.get_sample_value("ralph_unit_retries_total", labels) or 0.0


BACKOFF = {"max_attempts": 3, "backoff_seconds": 30, "backoff_factor": 2, "jitter": False}


async def test_a_provider_failing_twice_gives_success_on_the_third_attempt_at_the_backoffs_times(
    app: AppHarness, clock: FakeClock, provider: Provider
) -> None:
    client = app.client
    started = clock.now()
    retried_before = retries()
    run_id = await start(client, retry=BACKOFF)
    first = await in_status(client, run_id, "retrying", 1)
    assert first["reason"] == "provider_error"
    assert "provider down" in first["error"]
    assert first["next_attempt_at"] == stamp(started, 30)
    await clock.advance(29)
    await asyncio.sleep(0.1)
    assert (await user(client, run_id))["attempts"] == 1  # not before its time
    await clock.advance(1)
    second = await in_status(client, run_id, "retrying", 2)
    assert second["next_attempt_at"] == stamp(started, 90)
    provider.state = "up"
    await clock.advance(60)
    run = await run_status(client, run_id)
    assert run["status"] == "success"
    final = await user(client, run_id)
    assert (final["status"], final["attempts"], final["reason"]) == ("success", 3, "finished")
    assert final["error"] is None
    assert final["next_attempt_at"] is None
    history = (await client.get(f"/background/runs/{run_id}/users/u1/attempts")).json()
    assert [(a["attempt"], a["reason"]) for a in history] == [
        (1, "provider_error"),
        (2, "provider_error"),
        (3, "finished"),
    ]
    assert history[1]["started_at"] == stamp(started, 30)
    assert retries() - retried_before == 2
    assert all("provider down" in a["error"] for a in history[:2])


async def test_retry_after_moves_the_next_attempt(
    app: AppHarness, clock: FakeClock, provider: Provider
) -> None:
    provider.state = "limiting"
    started = clock.now()
    run_id = await start(app.client, retry=BACKOFF)
    first = await in_status(app.client, run_id, "retrying", 1)
    assert first["reason"] == "rate_limited"
    assert first["next_attempt_at"] == stamp(started, 120)
    requests = provider.requests
    await clock.advance(119)
    await asyncio.sleep(0.1)
    assert provider.requests == requests  # the provider is not asked again before
    provider.state = "up"
    await clock.advance(1)
    assert (await run_status(app.client, run_id))["status"] == "success"


async def test_max_attempts_one_fails_at_once(app: AppHarness) -> None:
    run_id = await start(app.client, retry={"max_attempts": 1})
    assert (await run_status(app.client, run_id))["status"] == "failed"
    final = await user(app.client, run_id)
    assert (final["status"], final["attempts"], final["reason"]) == ("failed", 1, "provider_error")


async def test_max_turns_and_budgets_are_never_retried(app: AppHarness, provider: Provider) -> None:
    provider.state = "looping"
    run_id = await start(app.client, max_turns=2)
    assert (await run_status(app.client, run_id))["status"] == "failed"
    final = await user(app.client, run_id)
    assert (final["status"], final["attempts"], final["reason"]) == ("failed", 1, "max_turns")

    body = notes_task(name="thrifty", budget={"max_tokens_per_user": 1})
    assert (await app.client.post("/background/tasks", json=body)).status_code == 201
    run = (await app.client.post("/background/tasks/thrifty/run?wait=true")).json()
    spent = await user(app.client, run["id"])
    assert (spent["status"], spent["attempts"]) == ("budget_exceeded", 1)


async def test_every_attempts_tokens_count_against_the_budget(
    app: AppHarness, clock: FakeClock, provider: Provider
) -> None:
    """Attempt 1 spends 15 tokens (one reply), then the provider fails; attempt 2 may make one
    call more under a 20-token budget per user, not start afresh."""
    provider.state = "one call, then down"
    budget = {"max_tokens_per_user": 20}
    run_id = await start(app.client, retry=BACKOFF, budget=budget)
    first = await in_status(app.client, run_id, "retrying", 1)
    assert first["total_tokens"] == 15
    provider.state = "looping"
    await clock.advance(30)
    final = await in_status(app.client, run_id, "budget_exceeded", 2)
    assert final["total_tokens"] == 30
    assert "30 tokens used, max_tokens_per_user is 20" in final["error"]


async def test_a_dry_run_retries_the_same_way(
    app: AppHarness, clock: FakeClock, provider: Provider
) -> None:
    body = notes_task(name="retrying", tools=["read_memory_block"], retry=BACKOFF)
    assert (await app.client.post("/background/tasks", json=body)).status_code == 201
    started = await app.client.post("/background/tasks/retrying/run", json={"dry_run": True})
    run_id = started.json()["run_id"]
    first = await in_status(app.client, run_id, "retrying", 1)
    assert first["next_attempt_at"] == stamp(clock.now(), 30)
    provider.state = "up"
    await clock.advance(30)
    run = await run_status(app.client, run_id)
    assert (run["status"], run["dry_run"]) == ("success", True)
    assert (await user(app.client, run_id))["attempts"] == 2


async def test_a_cancel_ends_pending_retries(app: AppHarness, clock: FakeClock) -> None:
    run_id = await start(app.client, retry=BACKOFF)
    await in_status(app.client, run_id, "retrying", 1)
    response = await app.client.post(f"/background/runs/{run_id}/cancel")
    assert response.status_code == 200, response.text
    run = await run_status(app.client, run_id)
    assert (run["status"], run["counts"]) == ("cancelled", {"cancelled": 1})
    await clock.advance(3600)
    await asyncio.sleep(0.1)
    assert (await user(app.client, run_id))["attempts"] == 1


async def test_a_retry_waiting_across_a_restart_happens_at_its_time_once_with_two_replicas(
    settings: Settings, clock: FakeClock, provider: Provider
) -> None:
    """The server stops while a user waits for its retry: the rerun recovery makes keeps the
    user's attempts and due time; two replicas recover it, one runs it, at that time."""
    with ModelServer(provider) as server:
        configured = using_model_server(settings, server)
        async with harness_for(configured, clock) as first:
            started = clock.now()
            run_id = await start(first.client, retry=BACKOFF | {"backoff_seconds": 300})
            await in_status(first.client, run_id, "retrying", 1)
            await first.services.coordinator.shutdown(grace_seconds=1)
        provider.state = "up"
        async with (
            harness_for(configured, clock) as one,
            harness_for(configured, clock) as other,
        ):
            await clock.advance(settings.run_lease_seconds + 1)
            recovered = [
                *(await one.services.scheduler.tick()).recovered,
                *(await other.services.scheduler.tick()).recovered,
            ]
            (rerun_id,) = set(recovered)
            rerun = await one.services.runs.user(rerun_id, "u1")
            assert (rerun.attempts, rerun.next_attempt_at) == (1, started + timedelta(seconds=300))
            requests = provider.requests
            await asyncio.sleep(0.1)
            assert provider.requests == requests  # the lease passed, the retry's time did not
            await clock.set(started + timedelta(seconds=300))
            await one.services.coordinator.drain()
            await other.services.coordinator.drain()
            done = await one.services.runs.user(rerun_id, "u1")
            assert (done.status, done.attempts) == (UserStatus.SUCCESS, 2)
            assert provider.requests == requests + 1  # once


def test_tasks_retry_by_default_and_a_task_file_can_switch_it_off() -> None:
    task = TaskDefinition.model_validate(
        {**notes_task(), "retry": {"max_attempts": 1}}, strict=False
    )
    assert task.retry.max_attempts == 1
    assert TaskDefinition.model_validate(notes_task()).retry == RetryPolicy()


# --- replay: a new run of a finished run's failed users ------------------------------------


async def test_retry_reruns_only_the_failed_users_and_links_the_runs(
    app: AppHarness, clock: FakeClock, provider: Provider
) -> None:
    client = app.client
    run_id = await start(client, retry=BACKOFF, user_ids=["u1", "u2", "u3"])
    await in_status(client, run_id, "retrying", 1)
    busy = await client.post(f"/background/runs/{run_id}/retry")
    assert busy.status_code == 409
    assert "still running" in busy.json()["detail"]
    await clock.advance(30)
    await in_status(client, run_id, "retrying", 2)
    await clock.advance(60)
    failed = await run_status(client, run_id)
    assert failed["counts"] == {"failed": 3}

    provider.state = "up"
    unknown = await client.post(f"/background/runs/{run_id}/retry", json={"user_ids": ["u9"]})
    assert unknown.status_code == 404
    assert "u9" in unknown.json()["detail"]
    response = await client.post(f"/background/runs/{run_id}/retry", json={"user_ids": ["u2"]})
    assert response.status_code == 202, response.text
    first_retry = await run_status(client, response.json()["run_id"])
    assert (first_retry["trigger_type"], first_retry["retry_of"]) == ("retry", run_id)
    assert first_retry["counts"] == {"success": 1}
    assert [u["user_id"] for u in first_retry["user_results"]] == ["u2"]
    assert (await user(client, first_retry["id"], "u2"))["attempts"] == 1

    # the default: every user that ended failed (u2 did, in the run retried)
    response = await client.post(f"/background/runs/{run_id}/retry")
    again = await run_status(client, response.json()["run_id"])
    assert [u["user_id"] for u in again["user_results"]] == ["u1", "u2", "u3"]
    ineligible = await client.post(
        f"/background/runs/{again['id']}/retry", json={"user_ids": ["u1"]}
    )
    assert ineligible.status_code == 422
    assert "u1 (success)" in ineligible.json()["detail"]
    nothing = await client.post(f"/background/runs/{again['id']}/retry")
    assert nothing.status_code == 422
    assert "no failed users" in nothing.json()["detail"]
    missing = await client.post("/background/runs/no-such-run/retry")
    assert missing.status_code == 404
