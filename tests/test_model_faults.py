"""Faults at the model boundary, through a real run: every fault ends each user with a clear
error or a recovered success, leaves nothing running, and the requests made are bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from httpx import AsyncClient

from ralph.agents.wire import Reply, ToolCall
from ralph.config import Settings
from ralph.testing.model_server import (
    Delay,
    Fail,
    Garbage,
    ModelServer,
    Responder,
    call,
    in_order,
    scripted,
    text,
)
from tests.helpers import notes_task, serving, using_model_server

# With RALPH_MODEL_MAX_RETRIES=1 a failing call is sent twice, and Agno tries the whole call
# once more: at most 4 requests for one model call.
RETRIES = 1
MODEL_TIMEOUT = 0.5


@dataclass(frozen=True)
class Fault:
    name: str
    responder: Callable[[], Responder]  # a fresh one per test: `in_order` keeps state
    status: str  # the user's end status
    says: str  # in the user's error (failed) or the agent's final text (success)
    requests: int
    tool_says: str | None = None  # in the tool result the model was sent back
    reason: str = "finished"  # why the unit ended, as recorded


NO_CHOICES = '{"id": "x", "object": "chat.completion", "created": 1, "model": "m"}'
FAULTS = [
    Fault(
        "429 with Retry-After, then fine",
        lambda: in_order(Fail(429, headers={"retry-after": "0"}), then=scripted(text("ok"))),
        "success",
        "ok",
        2,
    ),
    Fault(
        "429 without Retry-After, then fine",
        lambda: in_order(Fail(429), then=scripted(text("ok"))),
        "success",
        "ok",
        2,
    ),
    Fault(
        "429 asking to wait a day",
        lambda: scripted(Fail(429, headers={"retry-after": "86400"})),
        "failed",
        "rate limited: provider asked to wait 86400 s",
        2,
        reason="rate_limited",
    ),
    Fault(
        "429 on every request",
        lambda: scripted(Fail(429, "slow down", headers={"retry-after-ms": "10"})),
        "failed",
        "rate limited: slow down",
        4,
        reason="rate_limited",
    ),
    Fault(
        "500 on every request",
        lambda: scripted(Fail(500, "kaput", headers={"retry-after-ms": "10"})),
        "failed",
        "kaput",
        4,
        reason="provider_error",
    ),
    Fault(
        "a hang past the model timeout, then fine",
        lambda: in_order(Delay(5.0, text("late")), then=scripted(text("ok"))),
        "success",
        "ok",
        2,
    ),
    Fault(
        "a hang on every request",
        lambda: scripted(Delay(5.0, text("late"))),
        "failed",
        f"no reply within {MODEL_TIMEOUT} s",
        4,
        reason="provider_error",
    ),
    Fault(
        "a body that is not JSON",
        lambda: scripted(Garbage()),
        "failed",
        "malformed reply",
        2,
        reason="invalid_reply",
    ),
    Fault(
        "a body without choices",
        lambda: scripted(Garbage(NO_CHOICES)),
        "failed",
        "malformed",
        2,
        reason="invalid_reply",
    ),
    Fault(
        "an unknown tool",
        lambda: scripted(call("launch_rockets", target="moon"), text("done")),
        "success",
        "done",
        2,
        tool_says="there is no tool 'launch_rockets'; the tools are: read_memory_block",
    ),
    Fault(
        "tool arguments that are not JSON",
        lambda: scripted(
            Reply(tool_calls=(ToolCall("read_memory_block", '{"label": "stu'),)), text("done")
        ),
        "success",
        "done",
        2,
        tool_says="json",
    ),
]


@pytest.fixture
async def client(settings: Settings, model_server: ModelServer) -> AsyncIterator[AsyncClient]:
    settings = using_model_server(
        settings,
        model_server,
        model_max_retries=RETRIES,
        model_timeout_seconds=MODEL_TIMEOUT,
        wait_max_seconds=60.0,
    )
    async with serving(settings) as client:
        yield client


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_a_model_fault_ends_cleanly(
    client: AsyncClient, model_server: ModelServer, fault: Fault
) -> None:
    task = notes_task(
        name="faulty",
        system_prompt="review",
        tools=["read_memory_block"],
        timeout_seconds=30,
        retry={"max_attempts": 1},  # the fault's effect on one attempt (retries: test_retries)
    )
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    model_server.responder = fault.responder()
    run = (await client.post("/background/tasks/faulty/run?wait=true")).json()
    assert run["status"] == ("success" if fault.status == "success" else "failed")
    assert run["counts"] == {fault.status: 1}  # nothing left pending or running
    user = (await client.get(f"/background/runs/{run['id']}/users/u1")).json()
    assert (user["status"], user["reason"]) == (fault.status, fault.reason)
    if fault.status == "failed":
        assert fault.says in user["error"]
    else:
        assert user["error"] is None
        assert user["transcript"][-1] == {"role": "assistant", "content": fault.says}
    if fault.tool_says is not None:
        (result,) = [m for m in user["transcript"] if m["role"] == "tool"]
        assert fault.tool_says in result["content"].lower()
    assert model_server.calls == fault.requests
