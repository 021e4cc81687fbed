# Agno annotates these methods with bare `Dict`: their types are partly unknown to the checker.
# pyright: reportUnknownMemberType=false
"""An OpenAI-compatible chat model that posts its requests itself.

The OpenAI SDK walks every request through a typed transform before sending it; with several
agents in flight that walk is the largest single CPU cost of a model call. Agno already builds
the request in wire form, so `DirectOpenAI` posts it as is on a shared transport (see
`ralph.agents.transport`), validates the reply into the SDK's `ChatCompletion` type, and hands
it to Agno's own parser. Streaming, structured outputs given as pydantic classes and
provider-specific request options still go through the SDK (on `http_client`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from agno.exceptions import ModelProviderError
from agno.models.message import Message
from agno.models.openai.like import OpenAILike
from agno.models.openrouter import OpenRouter
from agno.models.response import ModelResponse
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

from ralph.agents.calls import current_call
from ralph.agents.ratelimit import RateLimit, estimate_tokens
from ralph.agents.transport import Reply, Transport, TransportError
from ralph.reasons import EndReason

_RETRY_STATUSES = {408, 409, 429}
_SDK_ONLY_PARAMS = {"extra_headers", "extra_query", "extra_body", "timeout"}


def _retry_after(response: Reply | None) -> float | None:
    """The seconds a reply's Retry-After(-ms) header asks to wait, if it gives a number."""
    if response is None:
        return None
    retry_after_ms = response.headers.get("retry-after-ms")
    retry_after = response.headers.get("retry-after")
    try:
        if retry_after_ms is not None:
            return max(0.0, float(retry_after_ms) / 1000)
        if retry_after is not None:
            return max(0.0, float(retry_after))
    except ValueError:
        pass
    return None


def _backoff(attempt: int) -> float:
    """Exponential back-off with jitter: 0.5 s, 1 s, 2 s ... at most 8 s."""
    return min(8.0, 0.5 * 2**attempt) * (0.75 + random.random() / 4)


@contextmanager
def _timed_request() -> Generator[None]:
    """Add a request through the SDK (its retries unseen: one request) to the caller's
    record, with the time until its answer (to the last chunk of a stream) or its failure."""
    started = time.perf_counter()
    try:
        yield
    finally:
        record = current_call.get()
        if record is not None:
            record.call_seconds.append(time.perf_counter() - started)


@dataclass
class DirectOpenAI(OpenAILike):
    """`OpenAILike` whose non-streaming calls skip the SDK's request transform and post on
    `transport` (without one, every call goes through the SDK)."""

    transport: Transport | None = field(default=None, repr=False)
    # a Retry-After longer than this ends the call ("rate limited") instead of waiting
    max_retry_after: float = 60.0
    # every request waits for it; a 429 slows it down for everyone sharing it
    limiter: RateLimit | None = field(default=None, repr=False)
    # ask for the provider's usage accounting (OpenRouter: each call's cost in `usage.cost`)
    usage_accounting: bool = False

    async def ainvoke(  # type: ignore[override]
        self,
        messages: list[Message],
        assistant_message: Message,
        response_format: Any = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        run_response: Any = None,
        compress_tool_results: bool = False,
    ) -> ModelResponse:
        params = self.get_request_params(
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
            run_response=run_response,
        )
        transport = self.transport
        # a response_format given as a JSON schema (a dict) is sent as it is; a pydantic
        # class is the SDK's to turn into one
        sdk_format = response_format is not None and not isinstance(response_format, dict)
        if sdk_format or _SDK_ONLY_PARAMS & params.keys() or transport is None:
            await self._wait_for_limit()
            with _timed_request():
                return await super().ainvoke(
                    messages,
                    assistant_message,
                    response_format=response_format,
                    tools=tools,
                    tool_choice=tool_choice,
                    run_response=run_response,
                    compress_tool_results=compress_tool_results,
                )
        body = {
            "model": self.id,
            "messages": self._format_all_messages(messages, compress_tool_results),
            **params,
        }
        if self.usage_accounting:
            body["usage"] = {"include": True}
        assistant_message.metrics.start_timer()
        data = await self._post(transport, body)
        assistant_message.metrics.stop_timer()
        try:
            completion = ChatCompletion.model_validate(data)
        except ValidationError as exc:
            raise self._error(f"malformed reply: {exc.error_count()} invalid fields") from exc
        return self._parse_provider_response(completion, response_format=response_format)

    async def ainvoke_stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[ModelResponse]:  # type: ignore[override]
        """The SDK's streaming call (chat), after the rate limit (ahead of background calls
        waiting for their turn)."""
        await self._wait_for_limit(foreground=True)
        with _timed_request():
            async for chunk in super().ainvoke_stream(*args, **kwargs):
                yield chunk

    async def _post(self, transport: Transport, body: dict[str, Any]) -> Any:
        url = f"{str(self.base_url).rstrip('/')}/chat/completions"
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        content = json.dumps(body).encode()
        attempts = (self.max_retries or 0) + 1
        estimate = estimate_tokens(len(content), self.max_tokens)
        record = current_call.get()
        for attempt in range(attempts):
            reply: Reply | None = None
            asked: float | None = None  # what the reply's Retry-After asks for
            if self.limiter is not None:
                await self.limiter.acquire(estimate)
            if record is not None and attempt:
                record.retries += 1
            started = time.perf_counter()
            try:
                reply = await transport.post(url, content, headers, self.timeout or 600.0)
            except TransportError as exc:
                if attempt + 1 == attempts:
                    raise self._error(str(exc)) from exc
            else:
                if record is not None:
                    record.call_seconds.append(time.perf_counter() - started)
                    record.rate_limited += reply.status == 429
                if reply.status < 400:
                    try:
                        data = json.loads(reply.body)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise self._error(f"malformed reply: {exc}") from exc
                    await self._charge(data, estimate)
                    return data
                asked = _retry_after(reply)
                if record is not None:
                    record.retry_after = asked
                if asked is not None and asked > self.max_retry_after:
                    raise self._error(
                        f"rate limited: provider asked to wait {asked:g} s (more than "
                        f"RALPH_MODEL_MAX_RETRY_AFTER_SECONDS={self.max_retry_after:g})",
                        reply.status,
                    )
                if reply.status == 429 and self.limiter is not None:
                    self.limiter.slow_down(asked)  # everyone waits, not just this call
                if (
                    reply.status not in _RETRY_STATUSES and reply.status < 500
                ) or attempt + 1 == attempts:
                    raise self._error(self._message(reply), reply.status)
            if reply is not None and reply.status == 429 and self.limiter is not None:
                continue  # the limiter makes this call (and all others) wait
            await asyncio.sleep(_backoff(attempt) if asked is None else asked)
        raise AssertionError("unreachable")

    async def _wait_for_limit(self, *, foreground: bool = False) -> None:
        """Before a call through the SDK, whose request size Ralph does not see."""
        if self.limiter is not None:
            await self.limiter.acquire(estimate_tokens(0, self.max_tokens), foreground=foreground)

    async def _charge(self, data: Any, estimate: int) -> None:
        """Count the tokens a reply used beyond the estimate against the token limit, and
        its cost (if the provider reports one) into the agent's record."""
        usage: Any = cast("dict[str, Any]", data).get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return
        reported = cast("dict[str, Any]", usage)
        total = reported.get("total_tokens")
        if self.limiter is not None and isinstance(total, int) and total > estimate:
            await self.limiter.charge(total - estimate)
        cost = reported.get("cost")
        record = current_call.get()
        if record is not None and isinstance(cost, int | float) and not isinstance(cost, bool):
            record.charged(float(cost))

    @staticmethod
    def _message(reply: Reply) -> str:
        prefix = "rate limited: " if reply.status == 429 else ""
        return prefix + DirectOpenAI._provider_message(reply)

    @staticmethod
    def _provider_message(reply: Reply) -> str:
        try:
            payload: Any = json.loads(reply.body)
            error: Any = payload.get("error", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            text = reply.body[:500].decode(errors="replace")
            return text or f"HTTP {reply.status}"
        if isinstance(error, dict):
            message: Any = cast("dict[str, Any]", error).get("message")
            return str(message or f"HTTP {reply.status}")
        return str(error)

    def _error(self, message: str, status: int | None = None) -> ModelProviderError:
        record = current_call.get()
        if record is not None:
            if status == 429 or message.startswith("rate limited"):
                record.failure = EndReason.RATE_LIMITED.value
            elif message.startswith("malformed reply"):
                record.failure = EndReason.INVALID_REPLY.value
            else:
                record.failure = EndReason.PROVIDER_ERROR.value
        return ModelProviderError(
            message=message,
            status_code=status if status is not None else 502,
            model_name=self.name,
            model_id=self.id,
        )


# OpenRouter comes first: its field defaults (base URL, max_tokens) and its request options,
# message format and reply parsing win; `ainvoke` comes from DirectOpenAI. Agno annotates the
# two bases' shared members differently (Optional or not), which the checker reports.
@dataclass
class DirectOpenRouter(  # pyright: ignore[reportIncompatibleVariableOverride, reportIncompatibleMethodOverride]
    OpenRouter, DirectOpenAI
):
    """Agno's `OpenRouter` posting its non-streaming calls as `DirectOpenAI` does, with
    OpenRouter's usage accounting on (each call's cost in USD)."""

    usage_accounting: bool = True
