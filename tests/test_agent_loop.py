"""What small models do, and what the agent loop makes of it: a tool call written as text is
made, a repeated call is answered from before, a call of a tool the agent lacks is answered
with the ones it has, outcomes say what happened, and message search finds words. Through the
real path: a task run over HTTP against the scripted model server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.config import Settings
from ralph.testing.model_server import ModelServer, call, scripted, text
from tests.helpers import notes_task, serving, using_model_server

FENCED_CALL = (
    "```json\n"
    '{"name": "edit_memory_block", "arguments": {"label": "notes", "append": "exam on 12 May",'
    ' "reason": "the user said so"}}\n'
    "```"
)


@pytest.fixture
async def client(settings: Settings, model_server: ModelServer) -> AsyncIterator[AsyncClient]:
    async with serving(using_model_server(settings, model_server, wait_max_seconds=60.0)) as client:
        yield client


async def run_for(client: AsyncClient, **overrides: Any) -> dict[str, Any]:
    """One run of a task for user u1 (a notes block holding "day 1"); the user's result with
    its transcript."""
    await client.put("/users/u1/blocks/notes", json={"body": "day 1"})
    values: dict[str, Any] = {
        "name": "loop",
        "user_ids": ["u1"],
        "tools": ["read_memory_block", "edit_memory_block", "query_messages"],
        "retry": {"max_attempts": 1},  # one attempt: what the model does in it
        **overrides,
    }
    assert (await client.post("/background/tasks", json=notes_task(**values))).status_code == 201
    run = (await client.post("/background/tasks/loop/run?wait=true")).json()
    user: dict[str, Any] = (await client.get(f"/background/runs/{run['id']}/users/u1")).json()
    return user


def tool_results(user: dict[str, Any]) -> list[str]:
    return [str(e.get("content")) for e in user["transcript"] if e["role"] == "tool"]


async def test_a_tool_call_written_as_fenced_json_is_made(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """Qwen with its own template writes its calls as JSON text: the call is made (it was taken
    for the final answer: `success` with nothing done)."""
    model_server.responder = scripted(text(FENCED_CALL), text("done"))
    user = await run_for(client)
    assert user["status"] == "success", user
    assert user["proposals_created"] == 1
    [proposal] = (await client.get("/proposals?user_id=u1")).json()
    assert proposal["new_text"] == "exam on 12 May"
    [made] = [e for e in user["transcript"] if e.get("tool_calls")]
    assert made["tool_calls"][0]["id"].startswith("from_text_")


async def test_a_repeated_identical_call_is_answered_from_before(
    client: AsyncClient, model_server: ModelServer
) -> None:
    read = call("read_memory_block", label="notes")
    model_server.responder = scripted(read, read, text("done"))
    user = await run_for(client)
    first, second = tool_results(user)
    assert "already called" not in first
    assert second.startswith(first)
    assert "You already called read_memory_block with these arguments" in second


async def test_a_call_of_a_tool_the_agent_lacks_names_the_tools_it_has(
    client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(text('{"name": "exam_info", "arguments": {}}'), text("ok"))
    user = await run_for(client)
    [answer] = tool_results(user)
    assert "there is no tool 'exam_info'" in answer
    assert "read_memory_block, edit_memory_block, query_messages" in answer


async def test_proposals_then_max_turns_is_a_success_stopped_by_max_turns(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """A user whose agent made a proposal and then ran out of turns ended `failed` (and its
    run `partial`): what it did is kept for review, and `stopped_by` says why it stopped."""
    model_server.responder = scripted(
        call("edit_memory_block", label="notes", append="likes chess", reason="said so"),
        call("read_memory_block", label="notes"),
        call("read_memory_block", label="other"),
    )
    user = await run_for(client, max_turns=2)
    assert (user["status"], user["stopped_by"], user["proposals_created"]) == (
        "success",
        "max_turns",
        1,
    )
    assert (user["error"], user["reason"]) == (None, "max_turns")
    metrics = (await client.get("/metrics")).text
    assert 'ralph_units_stopped_total{status="success",stopped_by="max_turns",task="loop"}' in (
        metrics
    )


async def test_an_agent_repeating_its_calls_is_stopped_after_its_work(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """The real model's habit: proposes, then reads the same block again and again until
    max_turns. The loop guard ends it after two repeated calls in a row: a success (its
    proposal is kept), four turns instead of ten."""
    model_server.responder = scripted(
        call("edit_memory_block", label="notes", append="day 2", reason="said so"),
        call("read_memory_block", label="notes"),
        call("read_memory_block", label="notes"),
        call("read_memory_block", label="notes"),
        call("read_memory_block", label="notes"),
        call("read_memory_block", label="notes"),
        text("done"),
    )
    user = await run_for(client)
    assert (user["status"], user["stopped_by"], user["reason"]) == (
        "success",
        "repeating",
        "repeating",
    )
    assert (user["turns_used"], user["proposals_created"], user["error"]) == (4, 1, None)


async def test_max_turns_with_nothing_done_is_failed(
    client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(call("read_memory_block", label="notes"))
    user = await run_for(client, max_turns=2)
    assert (user["status"], user["stopped_by"], user["reason"]) == (
        "failed",
        "max_turns",
        "max_turns",
    )


async def test_a_reply_that_is_an_unmade_tool_call_is_not_a_success(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """A call inside prose cannot be taken as a call, nor as an answer."""
    said = 'I will now call {"name": "read_memory_block", "arguments": {"label": "notes"}}'
    model_server.responder = scripted(text(said))
    user = await run_for(client)
    assert (user["status"], user["reason"]) == ("failed", "invalid_reply"), user
    assert "tool call written as text" in user["error"]


async def test_messages_are_found_by_words_in_any_order(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """`?q=` and query_messages: "cat Miso" finds "I have a cat named Miso" (a substring
    search found nothing), the message with more of the words first."""
    for content in ("I have a cat named Miso", "my cat is grey", "exams next week"):
        answer = await client.post("/users/u1/messages", json={"role": "user", "content": content})
        assert answer.status_code == 201, answer.text
    found = (await client.get("/users/u1/messages", params={"q": "Miso cat"})).json()
    assert [m["content"] for m in found] == ["I have a cat named Miso", "my cat is grey"]
    model_server.responder = scripted(call("query_messages", query="Miso the cat"), text("ok"))
    user = await run_for(client)
    [answer] = tool_results(user)
    assert json.loads(answer)[0]["content"] == "I have a cat named Miso"
