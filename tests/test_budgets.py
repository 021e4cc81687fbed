"""Token budgets, checked before each model call: per user and per run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import AsyncClient
from pydantic import SecretStr

from ralph.agents.wire import Reply, ToolCall, turn_of
from ralph.config import Settings
from ralph.testing.model_server import Action, ModelServer
from tests.helpers import serving, using_model_server

# The scripted server reports 10 prompt + 5 completion tokens per call unless told otherwise.
TOKENS_PER_CALL = 15


def tool_then_text(request: dict[str, Any]) -> Action:
    """An agent that wants two calls: a tool, then its answer."""
    if turn_of(request) == 0:
        return Reply(tool_calls=(ToolCall("list_memory_blocks", {}),))
    return Reply(content="done")


@pytest.fixture
async def client(settings: Settings, model_server: ModelServer) -> AsyncIterator[AsyncClient]:
    model_server.responder = tool_then_text
    async with serving(using_model_server(settings, model_server, wait_max_seconds=60.0)) as client:
        yield client


async def run(client: AsyncClient, users: int, budget: dict[str, int], batch: int = 5) -> Any:
    task = {
        "name": "thrifty",
        "system_prompt": "review",
        "tools": ["list_memory_blocks"],
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": [f"user-{i:02d}" for i in range(users)],
        "batch_size": batch,
        "budget": budget,
    }
    created = await client.post("/background/tasks", json=task)
    assert created.status_code == 201, created.text
    finished = (await client.post("/background/tasks/thrifty/run?wait=true")).json()
    return (await client.get(f"/background/runs/{finished['id']}?users_limit=100")).json()


async def test_a_user_over_budget_makes_no_further_call(
    client: AsyncClient, model_server: ModelServer
) -> None:
    detail = await run(client, 4, {"max_tokens_per_user": 10})
    assert model_server.calls == 4  # one call each: after it, 15 tokens >= 10
    assert detail["status"] == "partial"
    assert detail["counts"] == {"budget_exceeded": 4}
    for user in detail["user_results"]:
        assert (user["turns_used"], user["total_tokens"]) == (1, TOKENS_PER_CALL)
        assert user["error"] == "budget exceeded: 15 tokens used, max_tokens_per_user is 10"
        assert user["tokens_estimated"] is False


async def test_a_run_over_budget_stops_every_user(
    client: AsyncClient, model_server: ModelServer
) -> None:
    await check_run_budget(client, model_server)


@pytest.mark.slow
async def test_a_run_over_budget_stops_every_user_in_the_agent_process(
    settings: Settings, model_server: ModelServer
) -> None:
    """The agents run in the agent process: what they spend reaches the server's window."""
    model_server.responder = tool_then_text
    configured = using_model_server(
        settings, model_server, wait_max_seconds=60.0, worker_mode="subprocess"
    )
    async with serving(configured) as client:
        await check_run_budget(client, model_server)


async def check_run_budget(client: AsyncClient, model_server: ModelServer) -> None:
    batch = 5
    detail = await run(client, 20, {"max_tokens_per_run": 100}, batch=batch)
    spent = detail["total_tokens"]
    # at most the budget, plus the calls in flight when it was reached (one per agent)
    assert 100 <= spent <= 100 + batch * TOKENS_PER_CALL
    assert model_server.calls * TOKENS_PER_CALL == spent
    counts = detail["counts"]
    assert counts.get("budget_exceeded", 0) >= 20 - batch - 100 // (2 * TOKENS_PER_CALL)
    assert set(counts) <= {"success", "budget_exceeded"}
    assert detail["status"] == "partial"
    never_started = [u for u in detail["user_results"] if u["turns_used"] == 0]
    assert never_started
    assert {u["status"] for u in never_started} == {"budget_exceeded"}
    # once the budget is spent, the window starts nobody else
    assert any(u["attempts"] == 0 for u in never_started)


async def test_usage_not_reported_is_estimated(
    client: AsyncClient, model_server: ModelServer
) -> None:
    def no_usage(_: dict[str, Any]) -> Action:  # a server that reports zero usage
        return Reply(
            content="a reply of about forty characters here.", prompt_tokens=0, completion_tokens=0
        )

    model_server.responder = no_usage
    detail = await run(client, 1, {"max_tokens_per_user": 1000})
    (user,) = detail["user_results"]
    assert user["status"] == "success"
    assert user["tokens_estimated"] is True
    assert user["total_tokens"] > 10  # the prompt and the answer, at 4 characters a token


async def test_budget_is_validated(client: AsyncClient) -> None:
    task = {
        "name": "bad-budget",
        "system_prompt": "review",
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": ["a"],
    }
    for budget in ({"max_tokens_per_user": 0}, {"max_tokens_per_run": -1}, {"tokens": 5}):
        answer = await client.post("/background/tasks", json=task | {"budget": budget})
        assert answer.status_code == 422, budget


@pytest.mark.parametrize("provider", ["openrouter", "openai"])
async def test_cost_as_the_provider_reports_it(
    settings: Settings, model_server: ModelServer, provider: str
) -> None:
    """OpenRouter reports each call's cost when asked (`usage: {include: true}`): it is kept
    per user and summed per run. A provider that reports none leaves it unknown (null)."""

    def costly(request: dict[str, Any]) -> Action:
        asked = request.get("usage") == {"include": True}
        cost = 0.0012 if asked else None
        if turn_of(request) == 0:
            return Reply(tool_calls=(ToolCall("list_memory_blocks", {}),), cost_usd=cost)
        return Reply(content="done", cost_usd=cost)

    model_server.responder = costly
    configured = using_model_server(
        settings,
        model_server,
        model_provider=provider,
        model_api_key=SecretStr("key"),
        wait_max_seconds=60.0,
    )
    async with serving(configured) as client:
        detail = await run(client, 2, {"max_tokens_per_user": 1000})
    expected_user = pytest.approx(0.0024) if provider == "openrouter" else None
    assert [u["cost_usd"] for u in detail["user_results"]] == [expected_user, expected_user]
    assert detail["cost_usd"] == (pytest.approx(0.0048) if provider == "openrouter" else None)
