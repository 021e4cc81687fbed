"""Bad input is a 4xx with a message, never a 500; the token is checked before anything else;
the OpenAPI document describes the errors the API really sends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import AsyncClient
from pydantic import SecretStr

from ralph.config import Settings
from tests.helpers import notes_task, serving

LONE = "a\ud800"
TOKEN = "a-token-of-24-characters"


def escaped(value: Any) -> dict[str, Any]:
    """`json=` for httpx, as bytes with every non-ASCII character escaped (httpx would
    refuse to encode a lone surrogate)."""
    return {"content": json.dumps(value), "headers": {"content-type": "application/json"}}


async def test_a_lone_surrogate_is_a_422_everywhere(client: AsyncClient) -> None:
    """Valid JSON (`"a\\ud800"`) but not Unicode text: no database can store it."""
    sent = [
        ("PUT", "/users/u/blocks/student", {"body": LONE}),
        ("PUT", "/users/u/blocks/student", {"title": LONE, "body": "x"}),
        ("POST", "/users/u/proposals", {"label": "student", "reason": "r", "body": LONE}),
        ("POST", "/users/u/messages", {"content": LONE}),
        ("POST", "/chat/stream", {"user_id": "u", "message": LONE}),
        ("POST", "/users/u/proposals", {"label": "s", "reason": "r", LONE: "x"}),
        ("POST", "/background/tasks", {"name": "t", "system_prompt": [LONE]}),
    ]
    for method, url, body in sent:
        answer = await client.request(method, url, **escaped(body))
        assert answer.status_code == 422, answer.text
        assert "surrogate" in answer.json()["detail"]
    assert (await client.get("/users/u/blocks")).json() == []


async def test_a_surrogate_pair_is_one_character(client: AsyncClient) -> None:
    raw = b'{"body": "smile \\ud83d\\ude00 \\\\ud800 is text"}'
    answer = await client.put(
        "/users/u/blocks/student", content=raw, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["body"] == "smile \U0001f600 \\ud800 is text"


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("GET", "/background/runs/r?users_offset=99999999999999999999999", None),
        ("GET", "/users/u/blocks/student/history/99999999999999999999", None),
        ("GET", "/users/u/blocks/student/history/9223372036854775808", None),
        ("GET", "/users/u/messages?before=99999999999999999999", None),
        ("POST", "/users/u/blocks/student/revert", {"version": 2**64}),
        ("POST", "/users/u/blocks/student/revert", {"version": 1, "expected_version": 2**40}),
        ("PUT", "/users/u/blocks/student", {"body": "x", "expected_version": 2**63}),
        ("DELETE", "/users/u/blocks/student?expected_version=99999999999999999999", None),
    ],
)
async def test_integers_beyond_the_columns_are_a_422(
    client: AsyncClient, method: str, url: str, body: Any
) -> None:
    await client.put("/users/u/blocks/student", json={"body": "x"})
    answer = await client.request(method, url, json=body)
    assert answer.status_code == 422, answer.text
    assert "less than or equal" in answer.json()["detail"]


async def test_a_task_without_users_is_refused(client: AsyncClient) -> None:
    task: dict[str, Any] = {
        "name": "nobody",
        "system_prompt": "p",
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": [],
    }
    answer = await client.post("/background/tasks", json=task)
    assert answer.status_code == 422
    assert "at least one user" in answer.json()["detail"]
    task["user_ids"] = ["a"]
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    subset = await client.post("/background/tasks/nobody/run", json={"user_ids": []})
    assert subset.status_code == 422


async def test_405_names_every_method_of_the_path(client: AsyncClient) -> None:
    answer = await client.request("PATCH", "/background/tasks")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, POST"
    answer = await client.request("PATCH", "/users/u/blocks/student")
    assert answer.headers["allow"] == "DELETE, GET, PUT"


@pytest.fixture
async def token_client(settings: Settings) -> AsyncIterator[AsyncClient]:
    async with serving(settings.model_copy(update={"api_token": SecretStr(TOKEN)})) as client:
        yield client


async def test_the_token_is_checked_before_the_body_and_covers_the_docs(
    token_client: AsyncClient,
) -> None:
    for path in ("/openapi.json", "/docs", "/redoc", "/background/tasks", "/nowhere"):
        answer = await token_client.get(path)
        assert answer.status_code == 401, path
        assert answer.json() == {"detail": "missing or wrong bearer token"}
        assert answer.headers["www-authenticate"] == "Bearer"
    malformed = await token_client.put(
        "/users/u/blocks/student", content=b"{", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 401
    surrogate = await token_client.post("/users/u/messages", **escaped({"content": LONE}))
    assert surrogate.status_code == 401
    assert (await token_client.get("/health")).status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await token_client.get("/openapi.json", headers=auth)).status_code == 200
    assert (await token_client.get("/users/u/blocks", headers=auth)).status_code == 200
    wrong = {"Authorization": f"Bearer {TOKEN}x"}
    assert (await token_client.get("/users/u/blocks", headers=wrong)).status_code == 401


async def test_the_docs_may_be_public(settings: Settings) -> None:
    update = {"api_token": SecretStr(TOKEN), "api_docs_public": True}
    async with serving(settings.model_copy(update=update)) as client:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/users/u/blocks")).status_code == 401


async def test_every_documented_error_has_the_shape_sent(client: AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    error_ref = "#/components/schemas/ErrorOut"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, status)
    answer = await client.put("/users/u/blocks/student", json={"title": 5})
    assert answer.status_code == 422
    body = answer.json()
    assert isinstance(body["detail"], str)
    assert {"loc", "msg", "type"} <= set(body["errors"][0])
    assert set(schemas["ErrorOut"]["required"]) == {"detail"}


@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
async def test_deeply_nested_json_is_a_4xx(client: AsyncClient, depth: int) -> None:
    """Arrays nested deeper than Python's recursion limit, around a lone surrogate or not:
    a 4xx with the JSON error shape (the surrogate's guard raised RecursionError: a 500)."""
    for inner in ('"\\ud800"', '"x"'):
        body = "[" * depth + inner + "]" * depth
        answer = await client.post(
            "/users/u1/messages", content=body, headers={"content-type": "application/json"}
        )
        assert 400 <= answer.status_code < 500, answer.text
        assert isinstance(answer.json()["detail"], str)


async def test_request_bodies_refuse_unknown_keys(client: AsyncClient) -> None:
    """A webhook event posted to a run endpoint is not a run request (a webhook pointed at it
    started a run per event, each sending another event): 422, and no run."""
    created = await client.post("/background/tasks", json=notes_task(name="loop"))
    assert created.status_code == 201, created.text
    event: dict[str, Any] = {
        "id": "e1",
        "type": "run.finished",
        "created_at": "2026-01-01T00:00:00Z",
        "data": {},
    }
    answer = await client.post("/background/tasks/loop/run", json=event)
    assert answer.status_code == 422, answer.text
    assert "id" in answer.json()["detail"]
    assert (await client.get("/background/tasks/loop/runs")).json() == []
    answer = await client.put("/users/u/blocks/notes", json={"body": "x", "colour": "red"})
    assert answer.status_code == 422, answer.text


async def test_nul_characters_are_refused_in_every_body(client: AsyncClient) -> None:
    """NUL is stored by some databases, cut by others, and shown as nothing: one rule, 422
    (text that merely spells a backslash and u0000 is fine)."""
    for method, url, body in [
        ("POST", "/users/u/messages", {"content": "a\u0000b"}),
        ("PUT", "/users/u/blocks/notes", {"body": "x", "title": "a\u0000"}),
        ("POST", "/users/u/proposals", {"label": "notes", "reason": "r", "append": "\u0000"}),
    ]:
        answer = await client.request(method, url, json=body)
        assert answer.status_code == 422, answer.text
        assert "NUL" in answer.json()["detail"]
    spelled = await client.post("/users/u/messages", json={"content": "a \\u0000 b"})
    assert spelled.status_code == 201, spelled.text


async def test_route_words_and_chat_are_not_task_names(client: AsyncClient) -> None:
    """`apply` is a route beside the tasks' own (a task of that name answered GET, PUT and
    DELETE under it); `chat` is the chat agent's author (its proposals would be superseded)."""
    for name in ("apply", "chat"):
        answer = await client.post("/background/tasks", json=notes_task(name=name))
        assert answer.status_code == 422, answer.text
        assert "reserved" in answer.json()["detail"]
