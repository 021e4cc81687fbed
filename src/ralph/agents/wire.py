"""The OpenAI chat-completions wire format: what a scripted or offline model answers with.

Shared by the offline `dev` model and the test server in `ralph.testing`, so both speak
exactly the same protocol that real providers do.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call as the model writes it; `arguments` as a string is sent as is (even if it is
    not JSON, as a confused model's are)."""

    name: str
    arguments: dict[str, Any] | str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")

    @property
    def wire_arguments(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True, slots=True)
class Reply:
    """One model answer: text, tool calls, or both, with the usage to report."""

    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int = 10
    completion_tokens: int = 5
    cost_usd: float | None = None  # reported in `usage.cost`, as OpenRouter does


def completion(reply: Reply, model: str) -> dict[str, Any]:
    """A non-streaming `chat.completion` object."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.wire_arguments},
            }
            for call in reply.tool_calls
        ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": _usage(reply),
    }


def _usage(reply: Reply) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }
    if reply.cost_usd is not None:
        usage["cost"] = reply.cost_usd
    return usage


def stream_chunks(reply: Reply, model: str) -> Iterator[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a streamed answer (text in a few pieces)."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    text = reply.content or ""
    step = max(1, len(text) // 3)
    for start in range(0, len(text), step):
        yield chunk({"content": text[start : start + step]})
    for index, call in enumerate(reply.tool_calls):
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.wire_arguments},
                    }
                ]
            }
        )
    yield chunk({}, "tool_calls" if reply.tool_calls else "stop")
    yield {**base, "choices": [], "usage": _usage(reply)}


def sse(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """Server-sent events framing, ending with `data: [DONE]`."""
    for item in chunks:
        yield f"data: {json.dumps(item)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def turn_of(request: dict[str, Any]) -> int:
    """How many assistant messages the conversation already has: 0 on the first call."""
    return sum(1 for m in request.get("messages", []) if m.get("role") == "assistant")


def tool_names(request: dict[str, Any]) -> set[str]:
    tools: list[dict[str, Any]] = request.get("tools") or []
    return {t["function"]["name"] for t in tools if "function" in t}


def last_tool_results(request: dict[str, Any]) -> list[str]:
    """Contents of the tool messages after the last assistant message."""
    results: list[str] = []
    for message in reversed(request.get("messages", [])):
        if message.get("role") == "tool":
            results.append(str(message.get("content", "")))
        elif message.get("role") == "assistant":
            break
    return list(reversed(results))
