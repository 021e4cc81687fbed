"""The agent runtime against a real HTTP server speaking the OpenAI protocol."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from ralph.agents.models import ModelFactory
from ralph.agents.runner import AgentOutcome, run_agent
from ralph.agents.tools import ToolContext, build_tools, check_tool_names, workspace_dir
from ralph.agents.wire import Reply
from ralph.composition import Services
from ralph.config import Settings, SettingsError
from ralph.errors import InvalidInput
from ralph.memory.models import ProposalStatus
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
from tests.helpers import AppHarness, using_model_server


def factory_for(server: ModelServer, settings: Settings, retries: int = 0) -> ModelFactory:
    return ModelFactory(
        using_model_server(settings, server, model_max_retries=retries, model_timeout_seconds=5.0)
    )


@dataclass
class Ran(AgentOutcome):
    """An agent's outcome, with the proposals its tools stored."""

    proposal_ids: list[str] = field(default_factory=list[str])


async def run_for(
    services: Services,
    server: ModelServer,
    responder: Responder,
    *,
    tools: tuple[str, ...] = ("list_memory_blocks", "read_memory_block", "edit_memory_block"),
    max_turns: int = 10,
    timeout_seconds: float = 10.0,
    retries: int = 0,
    user_id: str = "u1",
) -> Ran:
    server.responder = responder
    factory = factory_for(server, services.settings, retries)
    try:
        context = ToolContext(
            user_id=user_id,
            memory=services.memory,
            conversations=services.conversations,
            data_dir=services.settings.data_dir,
            author="agent:test",
            run_id="run-1",
        )
        outcome = await run_agent(
            model=factory(),
            tools=tools,
            context=context,
            instructions="You keep notes about the user.",
            prompt="Do your background task.",
            max_turns=max_turns,
            timeout_seconds=timeout_seconds,
        )
        return Ran(**vars(outcome), proposal_ids=list(context.proposal_ids))
    finally:
        await factory.aclose()


async def run_once(
    factory: ModelFactory, services: Services, tools: tuple[str, ...] = ()
) -> AgentOutcome:
    """One short agent run for user u1 on a model of `factory` (left open)."""
    return await run_agent(
        model=factory(),
        tools=tools,
        context=ToolContext(
            "u1", services.memory, services.conversations, services.settings.data_dir
        ),
        instructions="x",
        prompt="go",
        max_turns=3,
        timeout_seconds=30,
    )


async def run_with(settings: Settings, services: Services) -> AgentOutcome:
    """`run_once` on a model factory of its own for `settings`."""
    factory = ModelFactory(settings)
    try:
        return await run_once(factory, services)
    finally:
        await factory.aclose()


async def test_two_edits_make_two_pending_proposals_in_three_turns(
    harness: AppHarness, model_server: ModelServer
) -> None:
    await harness.services.memory.put_block("u1", "student", title="S", body="Ann", author="api")
    outcome = await run_for(
        harness.services,
        model_server,
        scripted(
            call("edit_memory_block", label="student", body="Ann, 12", reason="age"),
            call("edit_memory_block", label="progress", body="week 1", reason="new"),
            text("proposed two edits"),
        ),
    )
    assert outcome.error is None
    assert outcome.turns_used == 3
    assert outcome.tool_calls == 2
    assert outcome.final_text == "proposed two edits"
    assert len(outcome.proposal_ids) == 2
    pending = await harness.services.memory.list_proposals("u1", ProposalStatus.PENDING)
    assert {p.id for p in pending} == set(outcome.proposal_ids)
    assert {p.author for p in pending} == {"agent:test"}
    # the block itself is untouched
    assert (await harness.services.memory.get_block("u1", "student")).body == "Ann"
    assert outcome.total_tokens == 45  # 3 calls x 15 tokens reported by the server
    roles = [entry["role"] for entry in outcome.transcript]
    assert roles.count("tool") == 2
    assert model_server.calls == 3


async def test_model_that_calls_tools_forever_stops_at_max_turns(
    harness: AppHarness, model_server: ModelServer
) -> None:
    asked = 0

    def another_read(_: dict[str, Any]) -> Reply:
        # a new call each time: the same one repeated is the loop guard's (test_agent_loop)
        nonlocal asked
        asked += 1
        return call("read_memory_block", label=f"block-{asked}")

    outcome = await run_for(harness.services, model_server, another_read, max_turns=4)
    assert outcome.turns_used == 4
    assert model_server.calls == 4
    assert outcome.stopped_by == "max_turns"
    assert outcome.error is not None
    assert "max_turns" in outcome.error


async def test_slow_model_hits_the_timeout(harness: AppHarness, model_server: ModelServer) -> None:
    outcome = await run_for(
        harness.services, model_server, scripted(Delay(5.0, text("late"))), timeout_seconds=0.3
    )
    assert outcome.stopped_by == "timeout"
    assert outcome.error == "timed out after 0.3 s"


async def test_429_then_success_is_retried(harness: AppHarness, model_server: ModelServer) -> None:
    outcome = await run_for(
        harness.services,
        model_server,
        in_order(
            Fail(429, "slow down", headers={"retry-after-ms": "10"}),
            Fail(503, "busy", headers={"retry-after-ms": "10"}),
            then=scripted(text("ok after retries")),
        ),
        retries=3,
    )
    assert outcome.error is None
    assert outcome.final_text == "ok after retries"
    assert outcome.turns_used == 1  # retries of one call are one turn
    assert model_server.calls == 3


async def test_request_over_the_model_timeout_is_retried(
    harness: AppHarness, model_server: ModelServer
) -> None:
    model_server.responder = in_order(
        Delay(5.0, text("too late")), then=scripted(text("second try"))
    )
    settings = using_model_server(
        harness.services.settings, model_server, model_max_retries=1, model_timeout_seconds=0.2
    )
    outcome = await run_with(settings, harness.services)
    assert outcome.error is None
    assert outcome.final_text == "second try"
    assert model_server.calls == 2


async def test_model_calls_reuse_connections(
    harness: AppHarness, model_server: ModelServer
) -> None:
    """One kept-alive connection serves consecutive calls of consecutive agents."""
    model_server.responder = scripted(call("list_memory_blocks"), text("done"))
    factory = factory_for(model_server, harness.services.settings)
    try:
        for _ in range(3):
            outcome = await run_once(factory, harness.services, ("list_memory_blocks",))
            assert outcome.final_text == "done"
    finally:
        await factory.aclose()
    assert model_server.calls == 6
    assert len(model_server.clients) == 1


async def test_model_calls_go_through_the_configured_proxy(
    harness: AppHarness, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY applies to the agents' pool as to the SDK: the only way to reach this
    made-up host is through the "proxy" (the scripted server answers absolute-form requests)."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{model_server.port}")
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = using_model_server(
        harness.services.settings, model_server, model_base_url="http://model.invalid/v1"
    )
    outcome = await run_with(settings, harness.services)
    assert outcome.error is None
    assert outcome.final_text == "done"
    assert model_server.calls == 1


def test_proxy_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ralph.agents.transport import proxy_for

    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    assert proxy_for("http://api.example/v1/chat/completions") == "http://proxy.invalid:3128"
    assert proxy_for("http://model.internal/v1/chat/completions") is None
    assert proxy_for("https://api.example/v1/chat/completions") is None  # no HTTPS_PROXY


async def test_persistent_5xx_is_a_clean_error(
    harness: AppHarness, model_server: ModelServer
) -> None:
    outcome = await run_for(
        harness.services,
        model_server,
        scripted(Fail(500, "boom", headers={"retry-after-ms": "10"})),
        retries=2,
    )
    assert outcome.error is not None
    assert model_server.calls == 6  # (2 client retries + 1) x (1 Agno retry + 1): bounded


async def test_garbage_json_is_a_clean_error(
    harness: AppHarness, model_server: ModelServer
) -> None:
    outcome = await run_for(harness.services, model_server, scripted(Garbage()), retries=1)
    assert outcome.error is not None
    assert outcome.final_text is None
    assert model_server.calls == 2  # tried once more, then reported


async def test_one_malformed_reply_is_retried(
    harness: AppHarness, model_server: ModelServer
) -> None:
    outcome = await run_for(
        harness.services,
        model_server,
        in_order(Garbage(), then=scripted(text("fine now"))),
        retries=1,
    )
    assert outcome.error is None
    assert outcome.final_text == "fine now"
    assert outcome.turns_used == 1


async def test_unknown_tool_names_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="unknown tool"):
        check_tool_names(["edit_memory_block", "rm_rf"], allow_shell=False)
    with pytest.raises(InvalidInput, match="RALPH_ALLOW_SHELL_TOOLS"):
        check_tool_names(["shell_tools"], allow_shell=False)
    check_tool_names(["shell_tools", "query_honcho"], allow_shell=True)


def test_provider_settings_are_checked(settings: Settings) -> None:
    with pytest.raises(SettingsError, match="RALPH_MODEL_BASE_URL"):
        ModelFactory(settings.model_copy(update={"model_provider": "openai"}))
    os.environ.pop("OPENROUTER_API_KEY", None)
    with pytest.raises(SettingsError, match="RALPH_MODEL_API_KEY"):
        ModelFactory(settings.model_copy(update={"model_provider": "openrouter"}))


async def test_dev_model_reviews_and_proposes(harness: AppHarness) -> None:
    services = harness.services
    await services.memory.put_block("u1", "student", title="S", body="Ann", author="api")
    factory = ModelFactory(services.settings)
    try:
        context = ToolContext(
            "u1",
            services.memory,
            services.conversations,
            services.settings.data_dir,
            author="agent:dev",
            run_id="r",
        )
        outcome = await run_agent(
            model=factory(),
            tools=("list_memory_blocks", "edit_memory_block"),
            context=context,
            instructions="review",
            prompt="go",
            max_turns=5,
            timeout_seconds=10,
        )
    finally:
        await factory.aclose()
    assert outcome.error is None
    assert outcome.turns_used == 3
    assert len(context.proposal_ids) == 1
    proposal = await services.memory.get_proposal(context.proposal_ids[0])
    assert proposal.label == "last_reviewed"
    assert "student" in (proposal.body or "")
    assert outcome.final_text is not None
    assert "not an LLM" in outcome.final_text


# --- workspace containment ------------------------------------------------------------------


def _file_tools(tmp_path: Path, services: Services, user_id: str = "u1") -> object:
    context = ToolContext(user_id, services.memory, services.conversations, tmp_path)
    (toolkit,) = build_tools(["file_tools"], context)
    return toolkit


async def test_file_tools_stay_inside_the_workspace(harness: AppHarness, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    toolkit = _file_tools(tmp_path, harness.services)
    workspace = workspace_dir(tmp_path, "u1")
    assert toolkit.base_dir == workspace  # type: ignore[attr-defined]

    assert "top secret" not in toolkit.read_file("../../../secret.txt")  # type: ignore[attr-defined]
    assert "top secret" not in toolkit.read_file(str(secret))  # type: ignore[attr-defined]
    (workspace / "link").symlink_to(secret)
    assert "top secret" not in toolkit.read_file("link")  # type: ignore[attr-defined]
    toolkit.save_file("escaped", "../../../escaped.txt")  # type: ignore[attr-defined]
    assert not (tmp_path / "escaped.txt").exists()
    toolkit.save_file("fine", "notes.txt")  # type: ignore[attr-defined]
    assert (workspace / "notes.txt").read_text() == "fine"


async def test_file_tool_answers_name_paths_inside_the_workspace(
    harness: AppHarness, tmp_path: Path
) -> None:
    """The model sees paths relative to the workspace, errors included: never the server's."""
    toolkit: Any = _file_tools(tmp_path, harness.services)
    answers = [
        toolkit.read_file("missing.txt"),
        toolkit.read_file_chunk("missing.txt", 0, 2),
        toolkit.save_file("hello", "notes/today.txt"),
        toolkit.list_files(),
        toolkit.search_files("**/*.txt"),
    ]
    assert not [a for a in answers if str(tmp_path) in a]
    assert answers[0] == "Error reading file: [Errno 2] No such file or directory: 'missing.txt'"
    assert answers[2] == "notes/today.txt"
    assert "notes/today.txt" in answers[4]


@pytest.mark.parametrize("user_id", ["..", "../other", "a/b", "a..b", "", "x" * 200])
def test_odd_user_ids_cannot_name_a_workspace(tmp_path: Path, user_id: str) -> None:
    with pytest.raises((ValueError, InvalidInput)):
        workspace_dir(tmp_path, user_id)
    assert not (tmp_path / "users").exists() or list((tmp_path / "users").iterdir()) == []


async def test_arguments_that_cannot_be_carried_out_go_back_to_the_model(
    harness: AppHarness, model_server: ModelServer
) -> None:
    """What a call cannot mean is sent back with what to send instead; the agent goes on."""
    outcome = await run_for(
        harness.services,
        model_server,
        scripted(
            call("read_memory_block"),  # missing label
            call("edit_memory_block", label="Not A Label!", reason="r", body="x"),
            call("edit_memory_block", label="student", reason="r"),  # nothing to change
            call("edit_memory_block", label="student", reason="r", old_text="absent", new_text="y"),
            text("gave up"),
        ),
    )
    assert outcome.error is None
    assert outcome.final_text == "gave up"
    results = [e["content"] for e in outcome.transcript if e["role"] == "tool"]
    assert results[0] == "error: missing label: read_memory_block needs label"
    assert results[1].startswith("error: label 'Not A Label!' is not a label")
    assert results[2].startswith("error: nothing to change. Send label and reason with one of")
    assert '"append": ' in results[2]  # one example of a call that works
    assert "copy old_text exactly" in results[3]
    assert outcome.proposal_ids == []


@pytest.mark.parametrize("provider", ["openai", "openrouter"])
async def test_direct_client_sends_what_the_sdk_sends(
    harness: AppHarness, model_server: ModelServer, provider: str
) -> None:
    """The factory's models skip the SDK's transform; the server must not be able to tell."""
    from agno.agent import Agent
    from agno.models.openai.like import OpenAILike
    from agno.models.openrouter import OpenRouter

    from ralph.agents.direct import DirectOpenAI, DirectOpenRouter

    sdk_class, direct_class = {
        "openai": (OpenAILike, DirectOpenAI),
        "openrouter": (OpenRouter, DirectOpenRouter),
    }[provider]
    model_server.responder = scripted(call("list_memory_blocks"), text("done"))
    settings = using_model_server(
        harness.services.settings,
        model_server,
        model_provider=provider,
        model_api_key=SecretStr("k"),
    )
    bodies: dict[str, list[dict[str, Any]]] = {}
    for name in ("sdk", "direct"):
        model_server.requests.clear()
        factory = ModelFactory(settings)
        model = sdk_class(id="scripted", base_url=model_server.base_url, api_key="k", max_retries=0)
        if name == "direct":
            model = factory()  # the factory's model, on its shared transport
            assert type(model) is direct_class
        context = ToolContext(
            "u1",
            harness.services.memory,
            harness.services.conversations,
            harness.services.settings.data_dir,
        )
        agent = Agent(
            model=model,
            tools=build_tools(["list_memory_blocks"], context),
            instructions="same",
            telemetry=False,
        )
        output = await agent.arun("go")  # pyright: ignore[reportUnknownMemberType]
        await factory.aclose()
        assert output.content == "done"
        bodies[name] = list(model_server.requests)
    assert len(bodies["sdk"]) == len(bodies["direct"]) == 2
    for sdk, direct in zip(bodies["sdk"], bodies["direct"], strict=True):
        messages: list[dict[str, Any]] = [*sdk["messages"], *direct["messages"]]
        for message in messages:
            calls: list[dict[str, Any]] = message.get("tool_calls") or []
            for tool_call in calls:
                tool_call.pop("id", None)  # ids are random per call
            message.pop("tool_call_id", None)
        # OpenRouter's usage accounting (each call's cost): asked for on the direct path only,
        # where the reply is read by Ralph
        accounting = direct.pop("usage", None)
        assert accounting == ({"include": True} if provider == "openrouter" else None)
        assert direct == sdk
    assert len(model_server.clients) == 2  # one connection for each model's two calls


async def test_unreachable_model_server_is_a_clean_error(harness: AppHarness) -> None:
    from ralph.testing.processes import free_port

    port = free_port()  # nobody listens on it
    settings = harness.services.settings.model_copy(
        update={
            "model_provider": "openai",
            "model_base_url": f"http://127.0.0.1:{port}/v1",
            "model_id": "nobody",
            "model_max_retries": 1,
        }
    )
    outcome = await run_with(settings, harness.services)
    assert outcome.error is not None
    assert "Connect" in outcome.error
    assert outcome.turns_used == 0
