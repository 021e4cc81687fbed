"""One real user through `extract` and `agent` on a real model: llama.cpp's server (the `local`
provider) on a GGUF file given by RALPH_TEST_MODEL_PATH (Qwen2.5-Coder-1.5B-Instruct Q4_K_M was
used; README: local models). Skipped when the model or the xllamacpp package is missing,
unless RALPH_REQUIRE_LOCAL_MODEL=1. Minutes on two cores."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from httpx import AsyncClient

from ralph.agents.local import local_model
from ralph.agents.textcalls import looks_like_a_call
from ralph.config import Settings
from tests.helpers import notes_task, serving

pytestmark = pytest.mark.slow

MODEL = os.environ.get("RALPH_TEST_MODEL_PATH", "")
TEMPLATE = Path(__file__).parents[1] / "src/ralph/agents/chat_templates/qwen2.5-tools.jinja"


def _missing() -> str | None:
    if not MODEL or not Path(MODEL).is_file():
        return "RALPH_TEST_MODEL_PATH names no GGUF file (README: local models)"
    if importlib.util.find_spec("xllamacpp") is None:
        return "xllamacpp is not installed (uv sync --extra local)"
    return None


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncClient]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("RALPH_REQUIRE_LOCAL_MODEL") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    local = settings.model_copy(
        update={
            "model_provider": "local",
            "model_path": Path(MODEL),
            "model_chat_template": TEMPLATE,
            "model_temperature": 0.2,
            "wait_max_seconds": 600.0,
        }
    )
    with local_model(local) as running:
        async with serving(running) as client:
            yield client


async def run(client: AsyncClient, name: str, **overrides: Any) -> dict[str, Any]:
    task = notes_task(
        name=name,
        system_prompt="You keep a learner's notes. Add what is new in their messages.",
        memory_blocks=["notes"],
        user_ids=["ana"],
        episode_messages=10,
        max_turns=6,
        timeout_seconds=300,
        **overrides,
    )
    assert (await client.post("/background/tasks", json=task)).status_code == 201
    finished = (await client.post(f"/background/tasks/{name}/run?wait=true")).json()
    user: dict[str, Any] = (await client.get(f"/background/runs/{finished['id']}/users/ana")).json()
    return user


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_one_learner_on_a_real_model(client: AsyncClient) -> None:
    await client.put("/users/ana/blocks/notes", json={"body": "Learning Spanish."})
    for said in ("hola!", "my Spanish exam is on 12 May", "I struggle with the subjunctive"):
        await client.post("/users/ana/messages", json={"role": "user", "content": said})

    extracted = await run(client, "facts", mode="extract", tools=[])
    assert extracted["status"] == "success", extracted
    texts = [
        (p["new_text"] or p["body"] or "").lower()
        for p in (await client.get("/proposals?user_id=ana&task=facts")).json()
    ]
    assert any("exam" in t for t in texts), texts

    agent = await run(
        client, "agent", tools=["read_memory_block", "append_memory_block", "query_messages"]
    )
    # whatever the model does, the result says it truthfully
    if agent["proposals_created"]:
        assert agent["status"] == "success", agent
    if agent["status"] == "success" and agent["stopped_by"] is None:
        final = [e for e in agent["transcript"] if e["role"] == "assistant"][-1]
        assert not looks_like_a_call(final.get("content")), final
