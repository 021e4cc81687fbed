"""Chat with a user's agent: memory context in, tokens out, messages and activity stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from agno.run.agent import RunContentEvent, RunErrorEvent

from ralph.agents.calls import CallRecord, current_call
from ralph.agents.kit import AgentKit
from ralph.agents.runner import TurnLimitReached, build_agent
from ralph.authors import CHAT as CHAT_AGENT
from ralph.clock import Clock
from ralph.conversations.models import Role
from ralph.observability.events import CHAT, observe_chat, observe_model_calls

log = structlog.get_logger(__name__)

CHAT_TOOLS = ("list_memory_blocks", "read_memory_block", "edit_memory_block", "query_messages")
CHAT_INSTRUCTIONS = (
    "You are Ralph, a helpful assistant who remembers the user. What you know about the user "
    "is below. To change it, propose an edit with edit_memory_block; a person approves it."
)


class ChatService:
    """One chat turn per call: streams the agent's answer as events."""

    def __init__(
        self, kit: AgentKit, clock: Clock, *, max_turns: int = 8, timeout: float = 300.0
    ) -> None:
        self._kit = kit
        self._conversations = kit.conversations
        self._clock = clock
        self._max_turns = max_turns
        self._timeout = timeout

    async def stream(self, user_id: str, message: str) -> AsyncIterator[dict[str, Any]]:
        """Events: `{"type": "token", "content"}`..., then `done` (with the stored message ids)
        or `error`. The user's message, the answer and the user's activity are stored when the
        answer is complete; a failed turn stores nothing. Its time and its model calls go to
        the metrics (`ralph_chat_turn_seconds`, the model figures with task `chat`)."""
        received_at = self._clock.now()
        began = time.perf_counter()
        instructions = await self._kit.instructions(CHAT_INSTRUCTIONS, user_id)
        model = self._kit.model()
        context = self._kit.context(user_id, author=str(CHAT_AGENT))
        agent, _ = build_agent(
            model, CHAT_TOOLS, context, instructions, self._max_turns, markdown=True
        )
        parts: list[str] = []
        error: str | None = None
        record = CallRecord()
        token = current_call.set(record)
        try:
            async with asyncio.timeout(self._timeout):
                async for event in agent.arun(  # pyright: ignore[reportUnknownMemberType]
                    message, stream=True, user_id=user_id
                ):
                    if isinstance(event, RunContentEvent) and isinstance(event.content, str):
                        if event.content:
                            parts.append(event.content)
                            yield {"type": "token", "content": event.content}
                    elif isinstance(event, RunErrorEvent):
                        error = event.content or "the model failed"
        except TimeoutError:
            error = f"no complete answer within {self._timeout:g} s"
        except TurnLimitReached as exc:
            error = str(exc)
        finally:
            current_call.reset(token)
            observe_model_calls(CHAT, record.call_seconds, record.rate_limited, record.retries)
            observe_chat(time.perf_counter() - began, error is not None)
        if error is not None:
            log.warning("chat_failed", user_id=user_id, error=error)
            yield {"type": "error", "detail": error}
            return
        answer = "".join(parts)
        stored_user = await self._conversations.add_message(
            user_id, Role.USER, message, received_at
        )
        stored_answer = await self._conversations.add_message(
            user_id, Role.ASSISTANT, answer, self._clock.now()
        )
        done: dict[str, Any] = {
            "type": "done",
            "user_message_id": stored_user.id,
            "assistant_message_id": stored_answer.id,
        }
        if self._conversations.archived:
            kept = stored_user.honcho_id is None or stored_answer.honcho_id is None
            done["stored_in_honcho"] = not kept
            if kept:
                done["warning"] = (
                    "the messages could not be stored in Honcho: Ralph keeps them and sends "
                    "them when Honcho is back"
                )
        yield done
