"""`/metrics` read by Prometheus' own parser: the database's figures and this process's."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from ralph.background.models import CronTrigger, TaskDefinition
from ralph.config import Settings
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import Fail, ModelServer, in_order, scripted, text
from tests.helpers import AppHarness, harness_for, using_model_server


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, of every sample in an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_follow_runs_proposals_and_the_scheduler(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    await clock.set(datetime(2026, 6, 1, 2, 59, tzinfo=UTC))
    task = TaskDefinition(
        name="nightly",
        system_prompt="review",
        tools=["list_memory_blocks", "edit_memory_block"],
        trigger=CronTrigger(schedule="0 3 * * *"),
        user_ids=["a", "b"],
    )
    await services.registry.create(task)
    before = samples((await harness.client.get("/metrics")).text)
    lag_before = before.get(("ralph_scheduler_lag_seconds_count", ()), 0.0)
    await clock.set(datetime(2026, 6, 1, 3, 0, 2, tzinfo=UTC))
    await services.scheduler.tick()
    await services.coordinator.drain()

    answer = await harness.client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    found = samples(answer.text)
    assert found[("ralph_runs", (("status", "success"), ("task", "nightly")))] == 1
    assert found[("ralph_run_users_recent", (("status", "success"), ("task", "nightly")))] == 2
    # the dev model proposes one note per user: both wait for review
    assert found[("ralph_proposals_pending", ())] == 2
    assert found[("ralph_proposals", (("status", "pending"),))] == 2
    assert found[("ralph_proposals", (("status", "approved"),))] == 0
    assert found[("ralph_tokens_total", (("kind", "input"), ("task", "nightly")))] > 0
    replica = services.scheduler.replica_id
    assert found[("ralph_scheduler_last_tick_age_seconds", (("replica", replica),))] == 0
    # fired 2 s after its slot
    assert found[("ralph_scheduler_lag_seconds_count", ())] == lag_before + 1
    assert found[("ralph_scheduler_lag_seconds_bucket", (("le", "2.0"),))] >= 1


async def test_metrics_need_the_token_unless_public(settings: Settings, clock: FakeClock) -> None:
    guarded = settings.model_copy(update={"api_token": SecretStr("s3cret")})
    async with harness_for(guarded, clock) as harness:
        assert (await harness.client.get("/metrics")).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert (await harness.client.get("/metrics", headers=auth)).status_code == 200
    public = guarded.model_copy(update={"metrics_public": True})
    async with harness_for(public, clock) as harness:
        assert (await harness.client.get("/metrics")).status_code == 200
        assert (await harness.client.get("/background/tasks")).status_code == 401


async def test_agent_figures_come_back_from_the_agent_process(
    settings: Settings, model_server: ModelServer
) -> None:
    """The agents run in the server's agent process (the default mode): their durations, the
    model calls' latencies, 429s and retries still reach the server's /metrics."""
    configured = using_model_server(
        settings, model_server, worker_mode="subprocess", model_max_retries=1
    )
    model_server.responder = in_order(
        Fail(429, "slow down", headers={"retry-after": "0"}), then=scripted(text("done"))
    )
    async with harness_for(configured) as harness:
        client = harness.client
        task = {
            "name": "figures",
            "system_prompt": "review",
            "trigger": {"type": "cron", "schedule": "0 3 * * *"},
            "user_ids": ["a"],
        }
        assert (await client.post("/background/tasks", json=task)).status_code == 201
        before = samples((await client.get("/metrics")).text)
        run = (await client.post("/background/tasks/figures/run?wait=true")).json()
        assert run["status"] == "success", run
        after = samples((await client.get("/metrics")).text)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"task": "figures", **labels}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("ralph_model_calls_total") == 2  # the 429, then the answer
    assert grew("ralph_model_rate_limited_total") == 1
    assert grew("ralph_model_retries_total") == 1
    assert grew("ralph_model_call_seconds_count") == 2
    assert grew("ralph_agent_run_seconds_count", status="success") == 1
    assert grew("ralph_agent_run_seconds_sum", status="success") > 0
