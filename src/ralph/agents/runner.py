"""Run one Agno agent for one user, with a hard cap on model calls and on wall-clock time."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from agno.agent import Agent
from agno.models.base import Model
from agno.run.agent import RunOutput
from agno.run.base import RunStatus as AgnoRunStatus
from agno.tools.function import Function

from ralph.agents.calls import CallRecord, current_call
from ralph.agents.textcalls import calls_in_text, looks_like_a_call
from ralph.agents.tools import ToolContext, build_tools
from ralph.reasons import EndReason


class TurnLimitReached(Exception):
    """Raised inside the model when an agent asks for one model call more than allowed."""


class Repeating(Exception):
    """Raised inside the model when the agent's latest tool calls all repeated earlier ones:
    a small model that has done its work often calls the same tool again and again instead
    of answering, until max_turns (what it did is kept)."""


# the loop guard: this many tool calls in a row that repeat earlier ones end the agent
REPEAT_LIMIT = 2
REPEATING = "stopped: repeating"


class BudgetExceeded(Exception):
    """Raised inside the model before a call the token budget does not allow."""


# how the messages of Ralph's own stops (above) begin or end
OWN_STOPS = ("stopped after ", "(max_turns)", REPEATING, "budget exceeded: ")


class _OwnStopsAreNotErrors(logging.Filter):
    """Agno logs the exception that ends its run as an ERROR ("Error in Agent run: ...");
    Ralph's own stops (the turn limit, the loop guard, the budget) are outcomes, recorded in
    the user's result, not errors: their lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Error in Agent run: ") and any(m in message for m in OWN_STOPS)
        )


logging.getLogger("agno").addFilter(_OwnStopsAreNotErrors())


@dataclass
class RunTokens:
    """Tokens the users of one run have spent (in this process), against the run's budget."""

    limit: int | None = None
    used: int = 0

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit


@dataclass
class TokenBudget:
    """What one user's agent has spent, checked before each model call. Usage comes from the
    provider's reply; a reply without usage is estimated from the text (4 characters a token,
    prompt and answer) and marked `estimated`."""

    per_user: int | None = None
    run: RunTokens | None = None
    used: int = 0
    estimated: bool = False
    # what the user's earlier attempts in the run spent: they count against `per_user` too
    earlier: int = 0

    def check(self) -> None:
        if self.per_user is not None and self.earlier + self.used >= self.per_user:
            spent = self.earlier + self.used
            raise BudgetExceeded(
                f"budget exceeded: {spent} tokens used, max_tokens_per_user is {self.per_user}"
            )
        if self.run is not None and self.run.exhausted:
            raise BudgetExceeded(
                f"budget exceeded: the run used {self.run.used} tokens, max_tokens_per_run is "
                f"{self.run.limit}"
            )

    def spend(self, tokens: int, estimated: bool) -> None:
        self.used += tokens
        self.estimated = self.estimated or estimated
        if self.run is not None:
            self.run.used += tokens


def _tokens_of(
    call_args: tuple[Any, ...], call_kwargs: dict[str, Any], response: Any
) -> tuple[int, bool]:
    """(tokens, estimated) of one model call: the provider's count, or an estimate."""
    usage = getattr(response, "response_usage", None)
    total = getattr(usage, "total_tokens", 0) or 0
    if total > 0:
        return int(total), False
    sent: Any = call_kwargs.get("messages", call_args[0] if call_args else None)
    messages = cast("list[Any]", sent) if isinstance(sent, list) else []
    chars = sum(len(str(getattr(m, "content", "") or "")) for m in messages)
    chars += len(str(getattr(response, "content", "") or ""))
    chars += len(str(getattr(response, "tool_calls", "") or ""))
    return max(1, chars // 4), True


@dataclass
class AgentOutcome:
    """What happened in one agent run for one user."""

    turns_used: int = 0
    tool_calls: int = 0
    final_text: str | None = None
    error: str | None = None
    stopped_by: str | None = None  # "max_turns" | "timeout" | "budget" | "repeating" | None
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    transcript: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    rate_limit_wait_seconds: float = 0.0
    tokens_estimated: bool = False
    cost_usd: float | None = None
    # the provider's answers, for metrics: each request's seconds, 429s, retried requests
    model_call_seconds: list[float] = field(default_factory=list[float])
    rate_limited_responses: int = 0
    model_retries: int = 0
    # why it ended (set by the runner; a unit's result records it)
    reason: EndReason = EndReason.FINISHED
    # seconds the provider asked to wait before the call it failed (its Retry-After)
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def take(self, record: CallRecord, turns: int) -> None:
        """The figures of the model calls made: `record`'s and the number of turns."""
        self.turns_used = turns
        self.rate_limit_wait_seconds = record.wait_seconds
        self.cost_usd = record.cost_usd
        self.model_call_seconds = record.call_seconds
        self.rate_limited_responses = record.rate_limited
        self.model_retries = record.retries

    def conclude(self, record: CallRecord, *, invalid: bool = False) -> None:
        """Set `reason` from how the run ended: what stopped it, the provider's last failure
        (`record`), or `invalid` (a reply that could not be used)."""
        stopped = {
            "max_turns": EndReason.MAX_TURNS,
            "timeout": EndReason.TIMEOUT,
            "budget": EndReason.BUDGET_EXCEEDED,
            "repeating": EndReason.REPEATING,
        }
        if self.stopped_by in stopped:
            self.reason = stopped[self.stopped_by]
        elif self.error is None:
            self.reason = EndReason.FINISHED
        elif invalid:
            self.reason = EndReason.INVALID_REPLY
        elif record.failure is not None:
            self.reason = EndReason(record.failure)
            self.retry_after = record.retry_after
        else:
            self.reason = EndReason.INTERNAL


# Agno's answer to a call of a tool the agent does not have
_AGNO_NO_SUCH_TOOL = "Error: The requested tool does not exist or is not available."
# the id prefix of a call recovered from the model's text (the transcript shows it)
TEXT_CALL_PREFIX = "from_text_"


def _recover_text_calls(response: Any, serial: int) -> int:
    """Turn a reply whose whole text is tool calls written as JSON into those calls (Agno
    then runs them like any other). Returns how many it recovered."""
    if getattr(response, "tool_calls", None):
        return 0
    content = getattr(response, "content", None)
    calls = calls_in_text(content) if isinstance(content, str) else []
    if not calls:
        return 0
    response.tool_calls = [
        {
            "id": f"{TEXT_CALL_PREFIX}{serial + index}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for index, call in enumerate(calls)
    ]
    response.content = None
    return len(calls)


def _name_the_tools(messages: Sequence[Any], offered: Sequence[str]) -> None:
    """Agno's answer to a call of a tool the agent does not have, rewritten to name the call
    and the tools there are (a model told only "does not exist" tries the same again)."""
    names: dict[str, str] = {}
    for message in messages:
        for call in cast("list[dict[str, Any]]", getattr(message, "tool_calls", None) or []):
            function = cast("dict[str, Any]", call.get("function") or {})
            names[str(call.get("id"))] = str(function.get("name", ""))
        if getattr(message, "role", None) == "tool" and message.content == _AGNO_NO_SUCH_TOOL:
            called = names.get(str(message.tool_call_id), "?")
            message.content = (
                f"error: there is no tool {called!r}; the tools are: {', '.join(offered)}"
            )


def limit_model_calls(
    model: Model,
    max_turns: int,
    budget: TokenBudget | None = None,
    tool_names: Sequence[str] = (),
    repeated: Callable[[], int] | None = None,
) -> Callable[[], int]:
    """Make `model` refuse a call once `max_turns` calls have completed, or once `budget` is
    spent (counting each call's tokens into it); return a reader of the count. With
    `tool_names` (the tools the agent has), a reply that is a tool call written as text is
    made that call, and a call of a tool it does not have is answered with the ones it has.

    A turn is one completed model call (an attempt that failed and was retried is not a turn).
    Agno's `tool_call_limit` caps tool executions only, so a model that keeps asking for tools
    would otherwise be called forever.
    """
    calls = 0
    recovered = 0
    # Agno's signatures are partly untyped; these wrappers pass everything through.
    ainvoke: Callable[..., Any] = model.ainvoke  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    ainvoke_stream: Callable[..., Any] = model.ainvoke_stream  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]

    def check() -> None:
        if calls >= max_turns:
            raise TurnLimitReached(f"stopped after {max_turns} model calls (max_turns)")
        if repeated is not None and repeated() >= REPEAT_LIMIT:
            raise Repeating(
                f"{REPEATING}: its last {REPEAT_LIMIT} tool calls repeated earlier ones (the "
                "same tool with the same arguments)"
            )

    async def limited_ainvoke(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls, recovered
        check()
        if budget is not None:
            budget.check()
        if tool_names:
            sent: Any = kwargs.get("messages", args[0] if args else [])
            _name_the_tools(cast("list[Any]", sent), tool_names)
        result = await ainvoke(*args, **kwargs)
        calls += 1
        if budget is not None:
            budget.spend(*_tokens_of(args, kwargs, result))
        if tool_names:
            recovered += _recover_text_calls(result, recovered)
        return result

    async def limited_ainvoke_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        nonlocal calls
        check()
        async for chunk in ainvoke_stream(*args, **kwargs):
            yield chunk
        calls += 1

    model.ainvoke = limited_ainvoke  # type: ignore[method-assign]
    model.ainvoke_stream = limited_ainvoke_stream  # type: ignore[method-assign]
    return lambda: calls


def _names_of(tool: Any) -> list[str]:
    """The function names a tool (an Agno Function or Toolkit) offers the model."""
    if isinstance(tool, Function):
        return [tool.name]
    functions = cast("dict[str, Any]", getattr(tool, "functions", None) or {})
    return list(functions) or [
        str(getattr(t, "__name__", t)) for t in cast("list[Any]", getattr(tool, "tools", []))
    ]


def build_agent(
    model: Model,
    tools: Sequence[str],
    context: ToolContext,
    instructions: str,
    max_turns: int,
    budget: TokenBudget | None = None,
    *,
    markdown: bool = False,
) -> tuple[Agent, Callable[[], int]]:
    """The Agno agent of one user (background or chat): `tools` bound to `context`, at most
    `max_turns` model calls within `budget`. Returns it with a counter of the calls made."""
    bound = build_tools(tools, context)
    offered = [name for tool in bound for name in _names_of(tool)]
    turns = limit_model_calls(model, max_turns, budget, offered, lambda: context.repeated)
    agent = Agent(
        model=model,
        tools=bound,
        instructions=instructions,
        telemetry=False,
        markdown=markdown,
    )
    return agent, turns


def _cut(text: str, budget: int) -> tuple[str, bool]:
    """`text` within `budget` characters, and whether it was cut."""
    return text[: max(budget, 0)], len(text) > budget


def _capped_tool_calls(
    calls: list[dict[str, Any]], budget: int
) -> tuple[list[dict[str, Any]], int, bool]:
    """A message's tool calls with their arguments (the model's text, any size) cut to share
    `budget` characters: (calls, characters used, whether any was cut)."""
    capped: list[dict[str, Any]] = []
    used = 0
    cut_any = False
    for call in calls:
        function = cast("dict[str, Any]", call.get("function") or {})
        name = str(function.get("name", ""))[:200]
        raw = function.get("arguments", "")
        arguments = raw if isinstance(raw, str) else json.dumps(raw, default=str)
        arguments, cut = _cut(arguments, budget - used - len(name))
        cut_any = cut_any or cut
        used += len(name) + len(arguments)
        entry: dict[str, Any] = {
            "id": str(call.get("id", ""))[:200],
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        if cut:
            entry["truncated"] = True
        capped.append(entry)
    return capped, used, cut_any


def _transcript(output: RunOutput | None, max_chars: int) -> list[dict[str, Any]]:
    """Messages with tool calls and results, cut to about `max_chars` characters in total:
    the model's text, its tool calls' arguments and the tools' results all count."""
    if output is None or not output.messages:
        return []
    entries: list[dict[str, Any]] = []
    budget = max_chars
    for message in output.messages:
        if message.from_history:
            continue
        entry: dict[str, Any] = {"role": message.role}
        content = message.content
        if content is not None:
            text = content if isinstance(content, str) else json.dumps(content, default=str)
            entry["content"], cut = _cut(text, budget)
            if cut:
                entry["truncated"] = True
            budget -= len(text)
        if message.tool_calls:
            calls, used, cut = _capped_tool_calls(message.tool_calls, budget)
            entry["tool_calls"] = calls
            if cut:
                entry["truncated"] = True
            budget -= used + (1 if cut else 0)
        if message.tool_name:
            entry["tool_name"] = message.tool_name[:200]
        entries.append(entry)
        if budget <= 0:
            entries.append({"role": "note", "content": "transcript truncated"})
            break
    return entries


def cap_transcript(entries: list[dict[str, Any]], max_chars: int) -> list[dict[str, Any]]:
    """`entries` up to about `max_chars` characters of JSON in all: the entry that crosses
    the cap keeps the start of its `content`, and a note ends the transcript."""
    kept: list[dict[str, Any]] = []
    budget = max_chars
    for entry in entries:
        size = len(json.dumps(entry, default=str))
        if size > budget:
            content = entry.get("content")
            if isinstance(content, str) and budget > 0:
                kept.append({**entry, "content": content[:budget], "truncated": True})
            kept.append({"role": "note", "content": "transcript truncated"})
            break
        kept.append(entry)
        budget -= size
    return kept


@asynccontextmanager
async def recorded_deadline(record: CallRecord, timeout_seconds: float) -> AsyncGenerator[None]:
    """The model calls made inside add to `record` (`current_call`), under a deadline of
    `timeout_seconds` that time spent waiting for the shared rate limit moves (it is not the
    agent's). TimeoutError when it passes."""
    token = current_call.set(record)
    try:
        async with asyncio.timeout(timeout_seconds) as deadline:
            record.extend = lambda seconds: deadline.reschedule(
                (deadline.when() or asyncio.get_running_loop().time()) + seconds
            )
            yield
    finally:
        current_call.reset(token)


async def run_agent(
    *,
    model: Model,
    tools: Sequence[str],
    context: ToolContext,
    instructions: str,
    prompt: str,
    max_turns: int,
    timeout_seconds: float,
    transcript_max_chars: int = 200_000,
    budget: TokenBudget | None = None,
) -> AgentOutcome:
    """Run one agent for `context.user_id` and report what it did. Never raises for agent or
    provider failures: they come back in `outcome.error`. Cancellation propagates.
    """
    outcome = AgentOutcome()
    budget = budget or TokenBudget()
    unmade_call = False
    agent, turns = build_agent(model, tools, context, instructions, max_turns, budget)
    output: RunOutput | None = None
    record = CallRecord()
    try:
        async with recorded_deadline(record, timeout_seconds):
            output = await agent.arun(prompt, user_id=context.user_id)  # pyright: ignore[reportUnknownMemberType]
    except TimeoutError:
        outcome.error = f"timed out after {timeout_seconds:g} s"
        outcome.stopped_by = "timeout"
    except TurnLimitReached as exc:  # when Agno lets it through rather than recording it
        outcome.error = str(exc)
        outcome.stopped_by = "max_turns"
    except Repeating as exc:
        outcome.error = str(exc)
        outcome.stopped_by = "repeating"
    except BudgetExceeded as exc:
        outcome.error = str(exc)
        outcome.stopped_by = "budget"
    outcome.take(record, turns())
    if output is not None:
        if output.status == AgnoRunStatus.error:
            outcome.error = str(output.content or "agent run failed")
        else:
            outcome.final_text = output.content if isinstance(output.content, str) else None
            unmade_call = looks_like_a_call(outcome.final_text)
            if unmade_call:
                outcome.error = (
                    "the model's last reply is a tool call written as text that could not be "
                    "run (not JSON of one call of a tool it has), not an answer"
                )
        if outcome.error and "max_turns" in outcome.error:
            outcome.stopped_by = "max_turns"
        if outcome.error and REPEATING in outcome.error:
            outcome.stopped_by = "repeating"
        if outcome.error and outcome.error.startswith("budget exceeded"):
            outcome.stopped_by = "budget"
        messages = [m for m in output.messages or [] if not m.from_history]
        outcome.tool_calls = sum(1 for m in messages if m.role == "tool")
        metrics = output.metrics
        if metrics is not None:
            outcome.input_tokens = metrics.input_tokens or 0
            outcome.output_tokens = metrics.output_tokens or 0
            outcome.total_tokens = metrics.total_tokens or 0
        outcome.transcript = _transcript(output, transcript_max_chars)
    if outcome.total_tokens == 0 and budget.used:
        # no usage from the provider (or the run stopped before Agno summed it)
        outcome.total_tokens = budget.used
        outcome.tokens_estimated = budget.estimated
    outcome.conclude(record, invalid=unmade_call)
    return outcome
