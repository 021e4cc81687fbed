# Agno annotates these methods with bare `Dict`: their types are partly unknown to the checker.
# pyright: reportUnknownMemberType=false
"""An OpenAI-compatible chat model that posts its requests itself.

The OpenAI SDK walks every request through a typed transform before sending it; with several
agents in flight that walk is the largest single CPU cost of a model call. Agno already builds
the request in wire form, so `DirectOpenAI` posts it as is on a shared httpx client, validates
the reply into the SDK's `ChatCompletion` type, and hands it to Agno's own parser. Streaming,
structured outputs and provider-specific request options still go through the SDK.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any, cast

import httpx
from agno.exceptions import ModelProviderError
from agno.models.message import Message
from agno.models.openai.like import OpenAILike
from agno.models.response import ModelResponse
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

_RETRY_STATUSES = {408, 409, 429}
_SDK_ONLY_PARAMS = {"extra_headers", "extra_query", "extra_body", "timeout"}


def _retry_delay(response: httpx.Response | None, attempt: int) -> float:
    """Seconds to wait before the next attempt: the server's Retry-After if it gives one,
    else exponential back-off with jitter (0.5 s, 1 s, 2 s ... at most 8 s)."""
    if response is not None:
        retry_after_ms = response.headers.get("retry-after-ms")
        retry_after = response.headers.get("retry-after")
        try:
            if retry_after_ms is not None:
                return max(0.0, float(retry_after_ms) / 1000)
            if retry_after is not None:
                return max(0.0, float(retry_after))
        except ValueError:
            pass
    return min(8.0, 0.5 * 2**attempt) * (0.75 + random.random() / 4)


@dataclass
class DirectOpenAI(OpenAILike):
    """`OpenAILike` whose non-streaming calls skip the SDK's request transform."""

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
        client = self.http_client
        if (
            response_format is not None
            or _SDK_ONLY_PARAMS & params.keys()
            or not isinstance(client, httpx.AsyncClient)
        ):
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
        assistant_message.metrics.start_timer()
        data = await self._post(client, body)
        assistant_message.metrics.stop_timer()
        try:
            completion = ChatCompletion.model_validate(data)
        except ValidationError as exc:
            raise self._error(f"malformed reply: {exc.error_count()} invalid fields") from exc
        return self._parse_provider_response(completion, response_format=response_format)

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Any:
        url = f"{str(self.base_url).rstrip('/')}/chat/completions"
        headers = {"Authorization": f"Bearer {self.api_key}"}
        attempts = (self.max_retries or 0) + 1
        for attempt in range(attempts):
            response: httpx.Response | None = None
            try:
                response = await client.post(
                    url, json=body, headers=headers, timeout=self.timeout or 600.0
                )
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if attempt + 1 == attempts:
                    raise self._error(f"{type(exc).__name__}: {exc}") from exc
            else:
                status = response.status_code
                if status < 400:
                    try:
                        return response.json()
                    except json.JSONDecodeError as exc:
                        raise self._error(f"malformed reply: {exc}") from exc
                if (status not in _RETRY_STATUSES and status < 500) or attempt + 1 == attempts:
                    raise self._error(self._message(response), status)
            await asyncio.sleep(_retry_delay(response, attempt))
        raise AssertionError("unreachable")

    @staticmethod
    def _message(response: httpx.Response) -> str:
        try:
            payload: Any = response.json()
            error: Any = payload.get("error", {})
        except (json.JSONDecodeError, AttributeError):
            return response.text[:500] or f"HTTP {response.status_code}"
        if isinstance(error, dict):
            message: Any = cast("dict[str, Any]", error).get("message")
            return str(message or f"HTTP {response.status_code}")
        return str(error)

    def _error(self, message: str, status: int | None = None) -> ModelProviderError:
        return ModelProviderError(
            message=message,
            status_code=status if status is not None else 502,
            model_name=self.name,
            model_id=self.id,
        )
