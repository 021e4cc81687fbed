"""Conversations in Honcho (`RALPH_MESSAGES_BACKEND=honcho`).

In CI: the id mapping, and what happens when Honcho cannot answer (nothing listening, or a
real HTTP server answering 500): messages are kept in Ralph's table and chat says so, agents
get a tool error and still succeed, the API answers 503. Against a real Honcho server
(`RALPH_TEST_HONCHO_URL`, skipped without it): messages land there, an agent's
`query_honcho` finds one by a word, and Honcho cut mid-run (a TCP proxy in front of it)
loses nothing.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from httpx import AsyncClient

from ralph.config import Settings
from ralph.conversations.honcho import peer_id, session_id, user_of_peer
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import ModelServer, call, scripted, text
from ralph.testing.processes import free_port
from ralph.testing.tcp_proxy import TcpProxy
from tests.helpers import AppHarness, harness_for, using_model_server

HONCHO_URL = os.environ.get("RALPH_TEST_HONCHO_URL")


def test_user_ids_map_to_honcho_peers_and_back() -> None:
    for user in ("u1", "ada-lovelace", "a.b@example.com", "snake_case", "_x_5f.", "A-Z09"):
        peer = peer_id(user)
        assert all(c.isalnum() or c in "_-" for c in peer), peer
        assert user_of_peer(peer) == user
    assert peer_id("ada-lovelace") == "ada-lovelace"  # plain ids are left as they are
    assert peer_id("a.b@c") == "a_2eb_40c"
    assert peer_id("a_2e") != peer_id("a.")  # an escape in an id cannot pass for another
    # no user id maps to the assistant's default peer ("_as" is no escape)
    assert user_of_peer("ralph_assistant") == "ralph_assistant"
    assert peer_id(user_of_peer("ralph_assistant")) != "ralph_assistant"
    assert session_id("a.b") == "ralph-a_2eb"


class FailingHoncho:
    """A real HTTP server that answers every request 500, as a broken Honcho would."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _fail(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = b'{"detail": "internal error"}'
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _fail  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(params=["refused", "http-500"])
def broken_honcho(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "refused":
        yield f"http://127.0.0.1:{free_port()}"  # nothing listens there
        return
    server = FailingHoncho()
    try:
        yield server.url
    finally:
        server.close()


def honcho_settings(settings: Settings, url: str, **extra: Any) -> Settings:
    return settings.model_copy(
        update={
            "messages_backend": "honcho",
            "honcho_url": url,
            "honcho_workspace": f"ralph-test-{uuid.uuid4().hex[:12]}",
            "honcho_timeout_seconds": 5.0,
            **extra,
        }
    )


@pytest.fixture
async def down(
    settings: Settings, clock: FakeClock, model_server: ModelServer, broken_honcho: str
) -> AsyncIterator[AppHarness]:
    configured = using_model_server(honcho_settings(settings, broken_honcho), model_server)
    async with harness_for(configured, clock, server=model_server) as harness:
        yield harness


async def chat(client: AsyncClient, user_id: str, message: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    body = {"user_id": user_id, "message": message}
    async with client.stream("POST", "/chat/stream", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


TASK = {
    "name": "reader",
    "system_prompt": "read the user's history",
    "tools": ["query_honcho"],
    "trigger": {"type": "idle", "idle_minutes": 30},
    "episode_messages": 20,
    "user_ids": ["u1"],
}


async def test_honcho_down_keeps_messages_and_agents_go_on(down: AppHarness) -> None:
    client = down.client
    stored = await client.post("/users/u1/messages", json={"content": "I run marathons"})
    assert stored.status_code == 201, stored.text
    kept = stored.json()
    assert kept["honcho_id"] is None
    assert kept["id"] > 0  # kept in Ralph's table, to be sent when Honcho is back
    # the activity is Ralph's, whatever Honcho does
    assert (await client.get("/users/u1/activity")).json()["last_message_at"] is not None
    listed = await client.get("/users/u1/messages")
    assert listed.status_code == 503
    assert listed.json()["detail"].startswith("conversation history is unavailable (Honcho:")

    down.server.responder = scripted(text("Hello!"))
    events = await chat(client, "u1", "hi there")
    done = events[-1]
    assert done["type"] == "done", events
    assert done["stored_in_honcho"] is False
    assert "Ralph keeps them" in done["warning"]

    # an agent asking for the history gets a clear tool error, and the run still succeeds
    assert (await client.post("/background/tasks", json=TASK)).status_code == 201
    down.server.responder = scripted(call("query_honcho", query="marathon"), text("done"))
    run = (await client.post("/background/tasks/reader/run?wait=true")).json()
    assert run["status"] == "success", run
    user = (await client.get(f"/background/runs/{run['id']}/users/u1")).json()
    transcript = json.dumps(user["transcript"])
    assert "conversation history is unavailable (Honcho:" in transcript
    assert "The user's recent messages are unavailable" in transcript

    # nothing was lost: the three messages wait, in order, and sync finds Honcho still away
    services = down.services
    assert await services.conversations.sync() == 0
    waiting = await services.conversations._store.oldest(10)  # pyright: ignore[reportPrivateUsage]
    assert [(m.role.value, m.content) for m in waiting] == [
        ("user", "I run marathons"),
        ("user", "hi there"),
        ("assistant", "Hello!"),
    ]


def test_the_honcho_backend_needs_its_url() -> None:
    with pytest.raises(ValueError, match="RALPH_HONCHO_URL"):
        Settings(
            messages_backend="honcho",
            _env_file=None,  # type: ignore[call-arg]
        )


# --- against a real Honcho server -----------------------------------------------------------

real = pytest.mark.skipif(
    HONCHO_URL is None, reason="RALPH_TEST_HONCHO_URL is not set (no Honcho server)"
)


@pytest.fixture
def honcho_proxy() -> Iterator[TcpProxy]:
    assert HONCHO_URL is not None
    target = urlsplit(HONCHO_URL)
    with TcpProxy(target.hostname or "127.0.0.1", target.port or 80) as proxy:
        yield proxy


@real
async def test_against_a_real_honcho(
    settings: Settings, clock: FakeClock, model_server: ModelServer, honcho_proxy: TcpProxy
) -> None:
    from honcho import Honcho  # pyright: ignore[reportMissingTypeStubs]

    url = f"http://127.0.0.1:{honcho_proxy.port}"
    configured = using_model_server(honcho_settings(settings, url), model_server)
    workspace = configured.honcho_workspace
    async with harness_for(configured, clock, server=model_server) as harness:
        client = harness.client
        # chat stores both messages in Honcho
        model_server.responder = scripted(text("Good luck with the marathon!"))
        events = await chat(client, "ada.l", "I am training for a marathon in May")
        assert events[-1]["stored_in_honcho"] is True, events
        direct = Honcho(base_url=HONCHO_URL, workspace_id=workspace, api_key="none")
        session = await direct.aio.session(session_id("ada.l"))
        page = await session.aio.messages(size=10)
        assert [(m.peer_id, m.content) for m in page.items] == [
            ("ada_2el", "I am training for a marathon in May"),
            ("ralph_assistant", "Good luck with the marathon!"),
        ]
        # an agent's query_honcho finds a message by a word in it
        task = {**TASK, "user_ids": ["ada.l"]}
        assert (await client.post("/background/tasks", json=task)).status_code == 201
        model_server.responder = scripted(call("query_honcho", query="marathon"), text("ok"))
        run = (await client.post("/background/tasks/reader/run?wait=true")).json()
        assert run["status"] == "success", run
        result = (await client.get(f"/background/runs/{run['id']}/users/ada.l")).json()
        transcript = json.dumps(result["transcript"])
        assert "I am training for a marathon in May" in transcript

        # Honcho cut mid-run: the agent is told, the run succeeds, messages wait in Ralph
        honcho_proxy.cut()
        run = (await client.post("/background/tasks/reader/run?wait=true")).json()
        assert run["status"] == "success", run
        result = (await client.get(f"/background/runs/{run['id']}/users/ada.l")).json()
        assert "conversation history is unavailable" in json.dumps(result["transcript"])
        kept = await client.post("/users/ada.l/messages", json={"content": "ran 30 km today"})
        assert kept.json()["honcho_id"] is None
        honcho_proxy.restore()
        assert await harness.services.conversations.sync() == 1
        found = (await client.get("/users/ada.l/messages?q=km")).json()
        assert [m["content"] for m in found] == ["ran 30 km today"]
        assert found[0]["honcho_id"] is not None
