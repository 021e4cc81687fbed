"""The offline `dev` model: deterministic, no network, and NOT an LLM.

It answers over the OpenAI protocol through an in-process transport, so the real Agno client
code path runs end to end. It reads the memory it is shown, calls the read/propose tools it is
given in a fixed order (list blocks, then propose a short "last reviewed" note), then answers.
"""

from __future__ import annotations

import json
from typing import Any, cast

import httpx

from ralph.agents.wire import (
    Reply,
    ToolCall,
    completion,
    last_tool_results,
    sse,
    stream_chunks,
    tool_names,
    turn_of,
)

DEV_MODEL_ID = "ralph-dev (offline, not an LLM)"
REVIEW_LABEL = "last_reviewed"


def dev_reply(request: dict[str, Any]) -> Reply:
    """The dev model's answer to one chat-completions request."""
    schema = _edits_schema(request)
    if schema is not None:
        return _extracted(schema, _last_said(request))
    tools = tool_names(request)
    turn = turn_of(request)
    if turn == 0 and "list_memory_blocks" in tools:
        return Reply(tool_calls=(ToolCall("list_memory_blocks", {}),))
    proposed = any(
        "edit_memory_block" in json.dumps(m.get("tool_calls") or [])
        for m in request.get("messages", [])
        if m.get("role") == "assistant"
    )
    if "edit_memory_block" in tools and not proposed:
        seen = last_tool_results(request)
        summary = seen[0][:200] if seen else "no blocks listed"
        return Reply(
            tool_calls=(
                ToolCall(
                    "edit_memory_block",
                    {
                        "label": REVIEW_LABEL,
                        "body": f"Reviewed by the dev model. Blocks seen: {summary}",
                        "reason": "dev model: routine review note",
                    },
                ),
            )
        )
    user_text = next(
        (
            str(m.get("content"))
            for m in reversed(request.get("messages", []))
            if m.get("role") == "user"
        ),
        "",
    )
    return Reply(
        content=(
            f"[dev model, not an LLM] I received: {user_text[:200]!r}. "
            "Configure RALPH_MODEL_PROVIDER for real answers."
        )
    )


def _edits_schema(request: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema an `extract` call asks for, if this is one."""
    wanted: Any = request.get("response_format")
    if not isinstance(wanted, dict):
        return None
    schema: Any = cast("dict[str, Any]", wanted).get("json_schema", {}).get("schema")
    return cast("dict[str, Any]", schema) if isinstance(schema, dict) else None


def _last_said(request: dict[str, Any]) -> str:
    """The first line of the request's last message (the extract mode: the user's first
    message, as `- text`), without its dash."""
    messages: Any = request.get("messages") or [{}]
    content: Any = cast("dict[str, Any]", messages[-1]).get("content")
    first = content.strip().split("\n", 1)[0] if isinstance(content, str) else ""
    return first.removeprefix("- ")


def _extracted(schema: dict[str, Any], said: str) -> Reply:
    """The extract mode's answer: a review note appended to the first label it may use, its
    reason what the user said first."""
    # the shape with edits (a reply says first whether it has any), its append edit
    shape: Any = schema["anyOf"][-1] if "anyOf" in schema else schema
    items: Any = shape["properties"]["edits"]["items"]
    append: Any = items["anyOf"][0] if "anyOf" in items else items
    labels = cast("list[str]", append["properties"]["label"].get("enum") or [REVIEW_LABEL])
    edit = {
        "label": labels[0] if labels else REVIEW_LABEL,
        "action": "append",
        "text": "Reviewed by the dev model.",
        "reason": said or "routine review",
    }
    return Reply(content=json.dumps({"new_facts": True, "edits": [edit]}))


async def _handle(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content or b"{}")
    reply = dev_reply(body)
    if body.get("stream"):
        return httpx.Response(
            200,
            content=b"".join(sse(stream_chunks(reply, DEV_MODEL_ID))),
            headers={"content-type": "text/event-stream"},
        )
    return httpx.Response(200, json=completion(reply, DEV_MODEL_ID))


def dev_http_client() -> httpx.AsyncClient:
    """An HTTP client whose every request is answered in-process by the dev model."""
    return httpx.AsyncClient(transport=httpx.MockTransport(_handle))
