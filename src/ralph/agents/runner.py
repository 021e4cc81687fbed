"""Run one Agno agent for one user, with a hard cap on model calls and on wall-clock time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from agno.agent import Agent
from agno.models.base import Model
from agno.run.agent import RunOutput
from agno.run.base import RunStatus as AgnoRunStatus

from ralph.agents.calls import CallRecord, current_call
from ralph.agents.tools import ToolContext, build_tools


class TurnLimitReached(Exception):
    """Raised inside the model when an agent asks for one model call more than allowed."""


class BudgetExceeded(Exception):
    """Raised inside the model before a call the token budget does not allow."""


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

    def check(self) -> None:
        if self.per_user is not None and self.used >= self.per_user:
            raise BudgetExceeded(
                f"budget exceeded: {self.used} tokens used, max_tokens_per_user is {self.per_user}"
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
    stopped_by: str | None = None  # "max_turns" | "timeout" | "budget" | None
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

    @property
    def ok(self) -> bool:
        return self.error is None


def limit_model_calls(
    model: Model, max_turns: int, budget: TokenBudget | None = None
) -> Callable[[], int]:
    """Make `model` refuse a call once `max_turns` calls have completed, or once `budget` is
    spent (counting each call's tokens into it); return a reader of the count.

    A turn is one completed model call (an attempt that failed and was retried is not a turn).
    Agno's `tool_call_limit` caps tool executions only, so a model that keeps asking for tools
    would otherwise be called forever.
    """
    calls = 0
    # Agno's signatures are partly untyped; these wrappers pass everything through.
    ainvoke: Callable[..., Any] = model.ainvoke  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    ainvoke_stream: Callable[..., Any] = model.ainvoke_stream  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]

    def check() -> None:
        if calls >= max_turns:
            raise TurnLimitReached(f"stopped after {max_turns} model calls (max_turns)")

    async def limited_ainvoke(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        check()
        if budget is not None:
            budget.check()
        result = await ainvoke(*args, **kwargs)
        calls += 1
        if budget is not None:
            budget.spend(*_tokens_of(args, kwargs, result))
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
    turns = limit_model_calls(model, max_turns, budget)
    agent = Agent(
        model=model,
        tools=build_tools(tools, context),
        instructions=instructions,
        telemetry=False,
        markdown=markdown,
    )
    return agent, turns


def _transcript(output: RunOutput | None, max_chars: int) -> list[dict[str, Any]]:
    """Messages with tool calls and results, cut to about `max_chars` characters in total."""
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
            entry["content"] = text[: max(budget, 0)]
            if len(text) > budget:
                entry["truncated"] = True
            budget -= len(text)
        if message.tool_calls:
            entry["tool_calls"] = message.tool_calls
        if message.tool_name:
            entry["tool_name"] = message.tool_name
        entries.append(entry)
        if budget <= 0:
            entries.append({"role": "note", "content": "transcript truncated"})
            break
    return entries


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
    agent, turns = build_agent(model, tools, context, instructions, max_turns, budget)
    output: RunOutput | None = None
    # time spent waiting for the shared rate limit moves the deadline: it is not the agent's
    record = CallRecord()
    token = current_call.set(record)
    try:
        async with asyncio.timeout(timeout_seconds) as deadline:
            record.extend = lambda seconds: deadline.reschedule(
                (deadline.when() or asyncio.get_running_loop().time()) + seconds
            )
            output = await agent.arun(prompt, user_id=context.user_id)  # pyright: ignore[reportUnknownMemberType]
    except TimeoutError:
        outcome.error = f"timed out after {timeout_seconds:g} s"
        outcome.stopped_by = "timeout"
    except TurnLimitReached as exc:  # when Agno lets it through rather than recording it
        outcome.error = str(exc)
        outcome.stopped_by = "max_turns"
    except BudgetExceeded as exc:
        outcome.error = str(exc)
        outcome.stopped_by = "budget"

    finally:
        current_call.reset(token)
    outcome.rate_limit_wait_seconds = record.wait_seconds
    outcome.cost_usd = record.cost_usd
    outcome.model_call_seconds = record.call_seconds
    outcome.rate_limited_responses = record.rate_limited
    outcome.model_retries = record.retries
    outcome.turns_used = turns()
    if output is not None:
        if output.status == AgnoRunStatus.error:
            outcome.error = str(output.content or "agent run failed")
        else:
            outcome.final_text = output.content if isinstance(output.content, str) else None
        if outcome.error and "max_turns" in outcome.error:
            outcome.stopped_by = "max_turns"
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
    return outcome
