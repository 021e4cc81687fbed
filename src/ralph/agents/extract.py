"""The `extract` mode: one structured model call per user returns the edits to make, as JSON.

Small models rarely finish a tool loop (they read the same block three times, search for what
is already in their input, invent labels, answer in prose); asked once for the new facts under
a JSON schema, the same model finds most of them at a small part of the tokens. mem0 and
LangMem's memory manager extract memories this way.

The schema is sent as the provider's `response_format` (`json_schema`), which servers such as
llama.cpp enforce while decoding; the labels the model may use are an `enum` in it. A provider
that cannot enforce it is checked here all the same: a reply that is not JSON of that shape is
answered once with what was wrong, and a second such reply is an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from agno.models.base import Model
from agno.models.message import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ralph.agents.calls import CallRecord
from ralph.agents.runner import (
    AgentOutcome,
    BudgetExceeded,
    TokenBudget,
    TurnLimitReached,
    limit_model_calls,
    recorded_deadline,
)
from ralph.conversations.search import found_in, query_words, with_stems

# at most this many edits are taken from one reply
MAX_EDITS = 10

INSTRUCTIONS = """\
# Answer
JSON only. Nothing worth remembering about the user next week (greetings, thanks, questions, \
small talk, what the block says): "new_facts" false, no edits. Else true, an edit per new \
fact: "label" {labels}; "action" "append", "replace" ("old_text" from the block: a fact \
changed) or "rewrite" (the whole block); "text" the fact, short; "reason" the user's words."""


def examples(label: str) -> list[tuple[str, str]]:
    """Exchanges shown before the user's (a small model follows examples more than rules):
    small talk has no facts; each fact is an edit of its own, in other words than the user's,
    its reason the user's words."""
    fact = '{{"label": "{label}", "action": "append", "text": "{text}", "reason": "{reason}"}}'
    dog = fact.format(label=label, text="Has a dog.", reason="I adopted a dog")
    meat = fact.format(label=label, text="Vegetarian.", reason="no meat")
    return [
        ("- thanks!\n- see you", '{"new_facts": false, "edits": []}'),
        ("- I adopted a dog\n- no meat for me", f'{{"new_facts": true, "edits": [{dog}, {meat}]}}'),
    ]


AGAIN = (
    "Your reply is not valid: {error}. Answer again with only the JSON object "
    '{{"edits": [...]}} as described, nothing else.'
)


def grounded(reason: str, said: Sequence[str]) -> bool:
    """Whether `reason` (an edit's reason or text) is the user's words: at least half of its
    words (or their stems) are in one of the messages `said`. A small model copies the
    facts of the examples it was shown, or makes one up, with a reason nobody wrote. Text
    without a word that can be checked ("ok") passes, and so does any when there are no
    messages to check."""
    forms = with_stems(query_words(reason))
    if not forms or not said:
        return True
    return any(2 * found_in(message.lower(), forms) >= len(forms) for message in said)


class ExtractedEdit(BaseModel):
    """One edit as the model wrote it."""

    model_config = ConfigDict(extra="ignore")
    label: str = Field(max_length=200)
    action: Literal["append", "replace", "rewrite"]
    text: str
    old_text: str = ""
    reason: str = ""

    def change(self) -> dict[str, str]:
        """The change as the proposal tools take it."""
        if self.action == "append":
            return {"append": self.text}
        if self.action == "replace":
            return {"old_text": self.old_text, "new_text": self.text}
        return {"body": self.text}


class ExtractReply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # false: nothing worth keeping (edits, if any, are not taken); absent: as if true
    new_facts: bool = True
    edits: list[ExtractedEdit] = Field(max_length=MAX_EDITS)


def reply_schema(labels: Sequence[str], new_blocks: bool) -> dict[str, Any]:
    """The JSON schema of a reply; the labels an `enum` unless new blocks are allowed. A
    reply says first whether there is anything new, and holds edits only if so: a small
    model asked for edits alone writes some for "thanks, see you tomorrow"."""
    label: dict[str, Any] = {"type": "string"}
    if not new_blocks:
        label["enum"] = list(labels)

    def edit(action: str, *fields: str) -> dict[str, Any]:
        """An edit of one action: an append has no `old_text` to write."""
        properties: dict[str, Any] = {"label": label, "action": {"const": action}}
        properties.update({name: {"type": "string"} for name in (*fields, "text", "reason")})
        return {
            "type": "object",
            "properties": properties,
            "required": list(properties),
            "additionalProperties": False,
        }

    edit_schema = {"anyOf": [edit("append"), edit("replace", "old_text"), edit("rewrite")]}

    def reply(new_facts: bool) -> dict[str, Any]:
        edits: dict[str, Any] = {"type": "array", "items": edit_schema}
        edits.update({"minItems": 1, "maxItems": MAX_EDITS} if new_facts else {"maxItems": 0})
        return {
            "type": "object",
            "properties": {"new_facts": {"const": new_facts}, "edits": edits},
            "required": ["new_facts", "edits"],
            "additionalProperties": False,
        }

    return {"anyOf": [reply(False), reply(True)]}


def response_format(labels: Sequence[str], new_blocks: bool) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "memory_edits",
            "schema": reply_schema(labels, new_blocks),
            "strict": True,
        },
    }


def instructions_for(labels: Sequence[str], new_blocks: bool) -> str:
    """How to answer, naming the labels the model may use."""
    named = ", ".join(f'"{label}"' for label in labels) or "(none yet)"
    if new_blocks:
        named += " or a new label (lowercase letters, digits, _ and -) for a new block"
    else:
        named = f"one of {named}"
    return INSTRUCTIONS.format(labels=named)


def _json_text(content: str) -> str:
    """The reply's JSON, without a fence around it (models add one even when told not to)."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text.strip()


def parse_reply(content: str | None) -> ExtractReply:
    """The reply as edits; ValueError saying what is wrong with it."""
    if not content or not content.strip():
        raise ValueError("it is empty")
    try:
        data: Any = json.loads(_json_text(content))
    except json.JSONDecodeError as exc:
        raise ValueError(f"it is not JSON ({exc.msg} at character {exc.pos})") from None
    if isinstance(data, list):  # the edits without their object
        data = {"edits": cast("list[Any]", data)}
    try:
        return ExtractReply.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'reply'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ValueError(problems) from None


@dataclass
class Extraction:
    """What the model returned: its outcome (turns, tokens, error, transcript) and edits."""

    outcome: AgentOutcome
    edits: list[ExtractedEdit] = field(default_factory=list[ExtractedEdit])


def _usage(response: Any) -> tuple[int, int, int]:
    usage = getattr(response, "response_usage", None)
    return (
        int(getattr(usage, "input_tokens", 0) or 0),
        int(getattr(usage, "output_tokens", 0) or 0),
        int(getattr(usage, "total_tokens", 0) or 0),
    )


async def extract_edits(
    *,
    model: Model,
    instructions: str,
    prompt: str,
    labels: Sequence[str],
    new_blocks: bool,
    timeout_seconds: float,
    budget: TokenBudget | None = None,
) -> Extraction:
    """Ask `model` once for the edits (twice if the first reply is not valid). Never raises
    for provider failures: they come back in `outcome.error`. Cancellation propagates."""
    outcome = AgentOutcome()
    budget = budget or TokenBudget()
    turns = limit_model_calls(model, 2, budget)
    messages = [
        Message(role="system", content=f"{instructions}\n\n{instructions_for(labels, new_blocks)}"),
        *(
            Message(role=role, content=content)
            for said, answered in examples(labels[0] if labels else "notes")
            for role, content in (("user", said), ("assistant", answered))
        ),
        Message(role="user", content=prompt),
    ]
    transcript: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    extraction = Extraction(outcome)
    invalid = False
    record = CallRecord()
    try:
        async with recorded_deadline(record, timeout_seconds):
            for attempt in range(2):
                response: Any = await model.ainvoke(  # pyright: ignore[reportUnknownMemberType]
                    messages=messages,
                    assistant_message=Message(role="assistant"),
                    response_format=response_format(labels, new_blocks),
                )
                for index, tokens in enumerate(_usage(response)):
                    name = ("input_tokens", "output_tokens", "total_tokens")[index]
                    setattr(outcome, name, getattr(outcome, name) + tokens)
                content = response.content if isinstance(response.content, str) else None
                transcript.append({"role": "assistant", "content": content or ""})
                try:
                    reply = parse_reply(content)
                    extraction.edits = reply.edits if reply.new_facts else []
                    outcome.final_text = content
                    break
                except ValueError as exc:
                    if attempt == 1:
                        outcome.error = f"invalid reply: {exc}"
                        invalid = True
                        break
                    again = AGAIN.format(error=exc)
                    transcript.append({"role": "user", "content": again})
                    messages += [
                        Message(role="assistant", content=content or ""),
                        Message(role="user", content=again),
                    ]
    except TimeoutError:
        outcome.error = f"timed out after {timeout_seconds:g} s"
        outcome.stopped_by = "timeout"
    except TurnLimitReached as exc:
        outcome.error = str(exc)
        outcome.stopped_by = "max_turns"
    except BudgetExceeded as exc:
        outcome.error = str(exc)
        outcome.stopped_by = "budget"
    except Exception as exc:  # the provider's failure, after its retries
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.take(record, turns())
    if outcome.total_tokens == 0 and budget.used:
        outcome.total_tokens = budget.used
        outcome.tokens_estimated = budget.estimated
    outcome.transcript = transcript
    outcome.conclude(record, invalid=invalid)
    return extraction
