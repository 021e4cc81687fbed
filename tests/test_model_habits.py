"""Tools take what real models write: every optional parameter filled (with "", null, 0),
numbers and booleans as strings, keys the schema does not have, several calls in one reply,
the same call twice. Through the real path: a task run over HTTP against the scripted model
server, checking the proposals that result."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.agents.runner import REPEATING
from ralph.agents.wire import Reply, ToolCall, turn_of
from ralph.config import Settings
from ralph.testing.model_server import ModelServer, call, scripted, text
from tests.helpers import serving, using_model_server

# What each edit tool is asked to do, and what a proposal that did it looks like.
INTENDED: dict[str, tuple[dict[str, Any], tuple[str, str | None, str | None]]] = {
    # (the arguments that matter, (kind, body, new_text) of the proposal)
    "edit_memory_block": ({"append": "day 2: ratios"}, ("append", None, "day 2: ratios")),
    "append_memory_block": ({"text": "day 2: ratios"}, ("append", None, "day 2: ratios")),
    "replace_memory_text": (
        {"old_text": "day 1", "new_text": "day one"},
        ("replace", None, "day one"),
    ),
    "rewrite_memory_block": ({"body": "day 1 and 2"}, ("body", "day 1 and 2", None)),
}
EMPTY_BY_TYPE: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False}


def fill_every_parameter(request: dict[str, Any]) -> Reply:
    """A model that calls the edit tool it is offered with every parameter filled in: the
    ones it means, and "", null or 0 for the rest (as GPT-4o-mini, Llama or Qwen often do)."""
    if turn_of(request) > 0:
        return text("done")
    (tool,) = [t["function"] for t in request["tools"] if t["function"]["name"] in INTENDED]
    meant, _ = INTENDED[tool["name"]]
    arguments: dict[str, Any] = {}
    for index, (name, spec) in enumerate(tool["parameters"]["properties"].items()):
        kind = spec.get("type") or spec["anyOf"][0]["type"]
        arguments[name] = None if index % 2 else EMPTY_BY_TYPE[kind]
    arguments |= {"label": "progress", "reason": "finished a unit", **meant}
    return Reply(tool_calls=(ToolCall(tool["name"], arguments),))


@pytest.fixture
async def client(settings: Settings, model_server: ModelServer) -> AsyncIterator[AsyncClient]:
    async with serving(using_model_server(settings, model_server, wait_max_seconds=60.0)) as client:
        yield client


async def run_task(client: AsyncClient, tools: list[str], users: list[str]) -> dict[str, Any]:
    for user in users:
        await client.put(f"/users/{user}/blocks/progress", json={"body": "day 1"})
    task = {
        "name": "habits",
        "system_prompt": "keep the progress log",
        "tools": tools,
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": users,
        "batch_size": 10,
    }
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    run: dict[str, Any] = (await client.post("/background/tasks/habits/run?wait=true")).json()
    assert run["counts"] == {"success": len(users)}
    return run


async def pending(client: AsyncClient) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await client.get("/proposals?status=pending&limit=1000")).json()
    return found


@pytest.mark.parametrize("tool", list(INTENDED))
async def test_thirty_users_every_parameter_filled(
    client: AsyncClient, model_server: ModelServer, tool: str
) -> None:
    model_server.responder = fill_every_parameter
    users = [f"user-{i:02d}" for i in range(30)]
    await run_task(client, [tool, "read_memory_block"], users)
    proposals = await pending(client)
    assert sorted(p["user_id"] for p in proposals) == users
    _, (kind, body, new_text) = INTENDED[tool]
    assert {(p["kind"], p["body"], p["new_text"], p["label"]) for p in proposals} == {
        (kind, body, new_text, "progress")
    }
    assert {p["reason"] for p in proposals} == {"finished a unit"}


async def test_body_wins_over_an_empty_old_text(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """The call that made 0 proposals before: body, old_text "", new_text and title all given."""
    model_server.responder = scripted(
        call(
            "edit_memory_block",
            label="progress",
            reason="r",
            body="day 1\nday 2",
            old_text="",
            new_text="day 2",
            title="Progress",
        ),
        text("done"),
    )
    await run_task(client, ["edit_memory_block"], ["u1"])
    (proposal,) = await pending(client)
    assert (proposal["kind"], proposal["body"], proposal["title"]) == (
        "body",
        "day 1\nday 2",
        "Progress",
    )


async def test_strings_for_numbers_extra_keys_and_nulls(
    client: AsyncClient, model_server: ModelServer
) -> None:
    for i in range(8):
        await client.post("/users/u1/messages", json={"content": f"message {i}"})
    model_server.responder = scripted(
        call("query_messages", query="", limit="3", include_metadata="true"),
        call(
            "edit_memory_block",
            label="Progress",
            reason="r",
            body=None,
            old_text=None,
            new_text=None,
            append="day 2",
            confidence=0.9,
        ),
        text("done"),
    )
    run = await run_task(client, ["edit_memory_block", "query_messages"], ["u1"])
    (proposal,) = await pending(client)
    assert (proposal["label"], proposal["kind"], proposal["new_text"]) == (
        "progress",
        "append",
        "day 2",
    )
    user = (await client.get(f"/background/runs/{run['id']}/users/u1")).json()
    first_tool_result = next(m for m in user["transcript"] if m["role"] == "tool")
    assert first_tool_result["content"].count('"role"') == 3  # limit "3" -> 3 messages


async def test_parallel_calls_and_a_repeated_call(
    client: AsyncClient, model_server: ModelServer
) -> None:
    append = ToolCall("append_memory_block", {"label": "progress", "text": "day 2", "reason": "r"})
    rewrite = ToolCall("rewrite_memory_block", {"label": "goals", "body": "ratios", "reason": "r"})
    model_server.responder = scripted(
        Reply(tool_calls=(append, rewrite)),  # two calls in one reply
        Reply(tool_calls=(ToolCall(append.name, append.arguments),)),  # the same call again
        text("done"),
    )
    run = await run_task(client, ["append_memory_block", "rewrite_memory_block"], ["u1"])
    proposals = await pending(client)
    assert sorted((p["label"], p["kind"]) for p in proposals) == [
        ("goals", "body"),
        ("progress", "append"),
    ]
    user = (await client.get(f"/background/runs/{run['id']}/users/u1")).json()
    results = [m["content"] for m in user["transcript"] if m["role"] == "tool"]
    assert len(results) == 3
    # the repeated call got the same proposal back, with a note, whichever of the two
    # parallel calls ended last
    assert results[2].startswith(results[0])
    assert "You already called append_memory_block" in results[2]
    assert user["proposals_created"] == 2


def test_ralphs_own_stops_are_not_logged_as_errors() -> None:
    """Agno logs the exception that ends its run as an ERROR; the loop guard, the turn limit
    and the budget are outcomes Ralph records, so their lines are dropped, others kept."""
    agno = logging.getLogger("agno")

    def shown(message: str) -> bool:
        return bool(agno.filter(logging.LogRecord("agno", logging.ERROR, "", 0, message, (), None)))

    assert not shown(f"Error in Agent run: {REPEATING}: its last 2 tool calls repeated ...")
    assert not shown("Error in Agent run: stopped after 6 model calls (max_turns)")
    assert not shown("Error in Agent run: budget exceeded: 900 tokens used, ...")
    assert shown("Error in Agent run: Connection refused")
    assert shown("stopped after a while")  # not Agno's run error
