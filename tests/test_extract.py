"""The `extract` mode: one structured model call per user, its edits proposed through the
tools' path. Through the real path: tasks run over HTTP against the scripted model server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.config import Settings
from ralph.testing.model_server import ModelServer, in_order, scripted, text
from tests.helpers import notes_task, serving, using_model_server


def edits(*items: dict[str, str]) -> str:
    return json.dumps({"edits": list(items)})


def edit(
    label: str, action: str, content: str, old_text: str = "", reason: str = "exam on 12 May"
) -> dict[str, str]:
    return {
        "label": label,
        "action": action,
        "old_text": old_text,
        "text": content,
        "reason": reason,
    }


@pytest.fixture
async def client(settings: Settings, model_server: ModelServer) -> AsyncIterator[AsyncClient]:
    async with serving(using_model_server(settings, model_server, wait_max_seconds=60.0)) as client:
        yield client


async def run_extract(client: AsyncClient, **overrides: Any) -> dict[str, Any]:
    """One run of an extract task for user u1 (blocks notes and goals; two messages)."""
    await client.put("/users/u1/blocks/notes", json={"body": "likes chess"})
    await client.put("/users/u1/blocks/goals", json={"body": "pass the exam"})
    for content in ("my exam is on 12 May", "I started learning Spanish"):
        await client.post("/users/u1/messages", json={"role": "user", "content": content})
    values: dict[str, Any] = {
        "name": "facts",
        "mode": "extract",
        "tools": [],
        "memory_blocks": ["notes", "goals"],
        "user_ids": ["u1"],
        "episode_messages": 10,
        "retry": {"max_attempts": 1},  # one attempt: what the model does in it
        **overrides,
    }
    created = await client.post("/background/tasks", json=notes_task(**values))
    assert created.status_code == 201, created.text
    run = (await client.post("/background/tasks/facts/run?wait=true")).json()
    user: dict[str, Any] = (await client.get(f"/background/runs/{run['id']}/users/u1")).json()
    return user


async def proposals(client: AsyncClient) -> list[tuple[str, str, str | None]]:
    found = (await client.get("/proposals?user_id=u1&status=pending")).json()
    return sorted((p["label"], p["kind"], p["new_text"] or p["body"]) for p in found)


async def test_a_structured_reply_becomes_proposals(
    client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(
        text(
            edits(
                edit("notes", "append", "Has an exam on 12 May."),
                edit("goals", "replace", "pass the Spanish exam", old_text="pass the exam"),
            )
        )
    )
    user = await run_extract(client)
    assert (user["status"], user["turns_used"], user["proposals_created"]) == ("success", 1, 2)
    assert user["reason"] == "finished"
    assert await proposals(client) == [
        ("goals", "replace", "pass the Spanish exam"),
        ("notes", "append", "Has an exam on 12 May."),
    ]
    [request] = model_server.requests
    assert "tools" not in request
    schema = request["response_format"]["json_schema"]["schema"]
    [nothing, something] = schema["anyOf"]
    assert nothing["properties"]["edits"]["maxItems"] == 0
    append, replace, _rewrite = something["properties"]["edits"]["items"]["anyOf"]
    assert append["properties"]["label"]["enum"] == ["notes", "goals"]
    assert "old_text" not in append["properties"]  # an append has none to write
    assert "old_text" in replace["required"]
    assert request["messages"][-1]["content"] == (
        "- my exam is on 12 May\n- I started learning Spanish"
    )
    assert "likes chess" in request["messages"][0]["content"]


async def test_a_label_the_task_does_not_list_is_refused(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """A provider that does not enforce the schema lets the model invent a block: refused
    (the model may not invent blocks), the other edits proposed."""
    model_server.responder = scripted(
        text(edits(edit("exam_info", "append", "exam 12 May"), edit("notes", "append", "x")))
    )
    user = await run_extract(client)
    assert user["status"] == "success"
    assert await proposals(client) == [("notes", "append", "x")]
    [refused] = [e for e in user["transcript"] if e["role"] == "edit" and e["number"] == 1]
    assert "'exam_info' is not one of this task's blocks" in refused["result"]


async def test_an_edit_whose_reason_nobody_said_is_refused(
    client: AsyncClient, model_server: ModelServer
) -> None:
    """A small model copies the facts of the examples it was shown ("I adopted a dog"): an
    edit whose text and reason are both not in the user's messages is refused; one whose
    reason quotes them, or whose fact they hold (a paraphrased reason), is kept."""
    model_server.responder = scripted(
        text(
            edits(
                edit("notes", "append", "Has a dog.", reason="I adopted a dog"),
                edit("notes", "append", "Learns Spanish.", reason="started learning spanish"),
                edit("notes", "append", "Exam on 12 May.", reason="a test is coming up"),
            )
        )
    )
    user = await run_extract(client)
    assert await proposals(client) == [
        ("notes", "append", "Exam on 12 May."),
        ("notes", "append", "Learns Spanish."),
    ]
    [refused] = [e for e in user["transcript"] if e["role"] == "edit" and e["number"] == 1]
    assert "neither the text nor the reason ('I adopted a dog')" in refused["result"]


async def test_new_blocks_when_the_task_allows_them(
    client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(text(edits(edit("languages", "rewrite", "Spanish"))))
    await run_extract(client, new_blocks=True)
    assert await proposals(client) == [("languages", "body", "Spanish")]
    schema = model_server.requests[0]["response_format"]["json_schema"]["schema"]
    something = schema["anyOf"][1]
    assert (
        "enum" not in something["properties"]["edits"]["items"]["anyOf"][0]["properties"]["label"]
    )


async def test_no_new_facts_means_no_edits(client: AsyncClient, model_server: ModelServer) -> None:
    """A reply that says there is nothing new is taken at its word, whatever edits it holds
    (a provider that does not enforce the schema may send both)."""
    reply = {"new_facts": False, "edits": [edit("notes", "append", "see you")]}
    model_server.responder = scripted(text(json.dumps(reply)))
    user = await run_extract(client)
    assert (user["status"], user["proposals_created"]) == ("success", 0)
    assert await proposals(client) == []


async def test_an_invalid_reply_is_asked_again_once(
    client: AsyncClient, model_server: ModelServer
) -> None:
    # in order: the examples before the user's messages are assistant turns too
    model_server.responder = in_order(
        text("Sure! The user has an exam."), text(edits(edit("notes", "append", "exam")))
    )
    user = await run_extract(client)
    assert (user["status"], user["turns_used"]) == ("success", 2)
    assert await proposals(client) == [("notes", "append", "exam")]
    again = model_server.requests[1]["messages"][-1]["content"]
    assert again.startswith("Your reply is not valid: it is not JSON")


async def test_a_second_invalid_reply_fails_the_user(
    client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(text('{"facts": ["exam"]}'))
    user = await run_extract(client)
    assert (user["status"], user["turns_used"], user["reason"]) == ("failed", 2, "invalid_reply")
    assert user["error"].startswith("invalid reply: edits: Field required")
    assert await proposals(client) == []


async def test_an_edit_the_block_already_holds_is_not_proposed(
    client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(text(edits(edit("notes", "append", "likes chess"))))
    user = await run_extract(client)
    assert user["status"] == "success"
    assert await proposals(client) == []
    [entry] = [e for e in user["transcript"] if e["role"] == "edit"]
    assert json.loads(entry["result"])["status"] == "unchanged"


async def test_dry_runs_and_the_dev_model(client: AsyncClient, settings: Settings) -> None:
    """A dry run's edits are previews; the offline dev model answers the extract call too."""
    async with serving(settings.model_copy(update={"wait_max_seconds": 60.0})) as dev:
        await dev.put("/users/u1/blocks/notes", json={"body": "likes chess"})
        task = notes_task(name="facts", mode="extract", tools=[], user_ids=["u1"])
        assert (await dev.post("/background/tasks", json=task)).status_code == 201
        run = await dev.post("/background/tasks/facts/run?wait=true", json={"dry_run": True})
        assert run.json()["counts"] == {"success": 1}, run.text
        previews = (await dev.get(f"/proposals?run_id={run.json()['id']}")).json()
        assert [(p["status"], p["new_text"]) for p in previews] == [
            ("preview", "Reviewed by the dev model.")
        ]


async def test_extract_offers_no_tools(client: AsyncClient) -> None:
    task = notes_task(name="facts", mode="extract", tools=["query_messages"])
    answer = await client.post("/background/tasks", json=task)
    assert answer.status_code == 422
    assert "offers no tools: remove 'query_messages'" in answer.json()["detail"]
