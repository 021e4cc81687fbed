"""Tool calls that a model wrote as text instead of making them.

Small models, and models served with their own chat template, often answer with the call as
JSON in the reply's text (bare, in a ```json fence, or inside `<tool_call>` tags) instead of
the provider's `tool_calls`. A reply whose whole content is such a call is a call: taking it for
the agent's final answer ended users `success` with nothing done.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class TextCall:
    name: str
    arguments: dict[str, Any]


def _candidates(content: str) -> list[str]:
    """The pieces of `content` that may each be one call's JSON."""
    text = content.strip()
    tagged = _TAGGED.findall(text)
    if tagged and not _TAGGED.sub("", text).strip():
        return [t for t in tagged if t.strip()]
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    # one call, or one call per line
    if text.startswith("{") and "\n" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) > 1 and all(line.startswith("{") and line.endswith("}") for line in lines):
            return lines
    return [text]


def _call_of(value: Any) -> TextCall | None:
    if not isinstance(value, dict):
        return None
    data = cast("dict[str, Any]", value)
    if "function" in data and isinstance(data["function"], dict):  # the wire form, as text
        data = cast("dict[str, Any]", data["function"])
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    arguments: Any = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    if set(data) - {"name", "arguments", "parameters", "type", "id"}:
        return None  # an object with other keys is an answer that looks like JSON, not a call
    return TextCall(name.strip(), cast("dict[str, Any]", arguments))


def calls_in_text(content: str | None) -> list[TextCall]:
    """The tool calls `content` consists of, or [] if it is anything else (prose around a
    call, JSON that is not a call, a call that does not parse)."""
    if not content or "name" not in content:
        return []
    calls: list[TextCall] = []
    for piece in _candidates(content):
        try:
            value: Any = json.loads(piece)
        except json.JSONDecodeError:
            return []
        found = (
            [_call_of(v) for v in cast("list[Any]", value)]
            if isinstance(value, list)
            else [_call_of(value)]
        )
        if not found or any(call is None for call in found):
            return []
        calls.extend(call for call in found if call is not None)
    return calls


_CALL_SHAPE = re.compile(r'<tool_call>|"name"\s*:\s*"[^"]+"\s*,\s*"(?:arguments|parameters)"\s*:')


def looks_like_a_call(content: str | None) -> bool:
    """Whether `content` holds something written as a tool call (in prose, or malformed):
    an agent whose last reply is one did not finish, whatever it says."""
    return bool(content) and _CALL_SHAPE.search(content or "") is not None
