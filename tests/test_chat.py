"""`POST /chat/stream` end to end: the real Agno client against the test model server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import ASGITransport, AsyncClient

from ralph.app import create_app
from ralph.config import Settings
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import Fail, ModelServer, call, scripted, text
from tests.helpers import using_model_server
from tests.test_metrics import samples


@pytest.fixture
async def chat_client(
    settings: Settings, model_server: ModelServer, clock: FakeClock
) -> AsyncIterator[AsyncClient]:
    # a limit of 3 model calls per answer (the default is 8)
    settings = using_model_server(settings, model_server, chat_max_turns=3)
    app = create_app(settings, clock=clock)
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://ralph.test") as client,
    ):
        yield client


async def _events(client: AsyncClient, user_id: str, message: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with client.stream(
        "POST", "/chat/stream", json={"user_id": user_id, "message": message}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


async def test_chat_streams_stores_and_records_activity(
    chat_client: AsyncClient, model_server: ModelServer, clock: FakeClock
) -> None:
    await chat_client.put("/users/u1/blocks/student", json={"title": "Student", "body": "Ann"})
    model_server.responder = scripted(
        call("edit_memory_block", label="student", body="Ann, likes chess", reason="said so"),
        text("Nice to meet you, Ann! I noted that you like chess."),
    )
    events = await _events(chat_client, "u1", "I like chess")
    tokens = "".join(e["content"] for e in events if e["type"] == "token")
    assert tokens == "Nice to meet you, Ann! I noted that you like chess."
    assert events[-1]["type"] == "done"

    # the memory context reached the model as instructions
    system = model_server.requests[0]["messages"][0]
    assert system["role"] == "system"
    assert "Ann" in system["content"]
    assert model_server.requests[0]["stream"] is True

    messages = (await chat_client.get("/users/u1/messages")).json()
    assert [(m["role"], m["content"]) for m in messages] == [
        ("assistant", tokens),
        ("user", "I like chess"),
    ]
    activity = (await chat_client.get("/users/u1/activity")).json()["last_message_at"]
    assert activity is not None
    pending = (await chat_client.get("/users/u1/proposals?status=pending")).json()
    assert [p["author"] for p in pending] == ["agent:chat"]
    assert (await chat_client.get("/users/u1/blocks/student")).json()["body"] == "Ann"


async def test_failed_chat_stores_nothing(
    chat_client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(Fail(500, "provider down"))
    events = await _events(chat_client, "u2", "hello?")
    assert events[-1]["type"] == "error"
    assert (await chat_client.get("/users/u2/messages")).json() == []
    assert (await chat_client.get("/users/u2/activity")).json()["last_message_at"] is None


async def test_chat_validates_input(chat_client: AsyncClient) -> None:
    bad = await chat_client.post("/chat/stream", json={"user_id": "a..b", "message": "x"})
    assert bad.status_code == 422
    empty = await chat_client.post("/chat/stream", json={"user_id": "u1", "message": ""})
    assert empty.status_code == 422


async def test_chat_answer_stops_at_the_turn_limit(
    chat_client: AsyncClient, model_server: ModelServer
) -> None:
    model_server.responder = scripted(call("list_memory_blocks"))  # never answers
    events = await _events(chat_client, "u3", "loop forever")
    assert events[-1]["type"] == "error"
    assert events[-1]["detail"].startswith("stopped after 3 model calls")
    assert model_server.calls == 3
    assert (await chat_client.get("/users/u3/messages")).json() == []


async def test_chat_turns_and_their_model_calls_reach_the_metrics(
    chat_client: AsyncClient, model_server: ModelServer
) -> None:
    def figures(text: str) -> tuple[float, float, float]:
        found = samples(text)
        return (
            found.get(("ralph_chat_turn_seconds_count", (("status", "success"),)), 0.0),
            found.get(("ralph_chat_turn_seconds_count", (("status", "error"),)), 0.0),
            found.get(("ralph_model_calls_total", (("task", "chat"),)), 0.0),
        )

    before = figures((await chat_client.get("/metrics")).text)
    model_server.responder = scripted(call("list_memory_blocks"), text("Hello!"))
    assert (await _events(chat_client, "u1", "hi"))[-1]["type"] == "done"
    model_server.responder = scripted(Fail(400, "bad request"))
    assert (await _events(chat_client, "u1", "hi"))[-1]["type"] == "error"
    after = figures((await chat_client.get("/metrics")).text)
    # one answered turn of two model requests, one failed turn of one
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (1, 1, 3)
