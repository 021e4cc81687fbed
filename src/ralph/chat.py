"""Chat with a user's agent: memory context in, tokens out, messages and activity stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from agno.agent import Agent
from agno.run.agent import RunContentEvent, RunErrorEvent

from ralph.agents.models import ModelFactory
from ralph.agents.runner import TurnLimitReached, limit_model_calls
from ralph.agents.tools import ToolContext, build_tools
from ralph.clock import Clock
from ralph.conversations.store import ConversationStore, Role
from ralph.memory.service import MemoryService

log = structlog.get_logger(__name__)

CHAT_TOOLS = ("list_memory_blocks", "read_memory_block", "edit_memory_block", "query_messages")
CHAT_INSTRUCTIONS = (
    "You are Ralph, a helpful assistant who remembers the user. What you know about the user "
    "is below. To change it, propose an edit with edit_memory_block; a person approves it."
)


class ChatService:
    """One chat turn per call: streams the agent's answer as events."""

    def __init__(
        self,
        *,
        memory: MemoryService,
        conversations: ConversationStore,
        models: ModelFactory,
        clock: Clock,
        data_dir: Path,
        max_turns: int = 8,
        timeout: float = 300.0,
    ) -> None:
        self._memory = memory
        self._conversations = conversations
        self._models = models
        self._clock = clock
        self._data_dir = data_dir
        self._max_turns = max_turns
        self._timeout = timeout

    async def stream(self, user_id: str, message: str) -> AsyncIterator[dict[str, Any]]:
        """Events: `{"type": "token", "content"}`..., then `done` (with the stored message ids)
        or `error`. The user's message, the answer and the user's activity are stored when the
        answer is complete; a failed turn stores nothing."""
        received_at = self._clock.now()
        instructions = await self._memory.instructions_with_memory(CHAT_INSTRUCTIONS, user_id)
        model = self._models()
        limit_model_calls(model, self._max_turns)
        agent = Agent(
            model=model,
            tools=build_tools(
                CHAT_TOOLS,
                ToolContext(
                    user_id=user_id,
                    memory=self._memory,
                    conversations=self._conversations,
                    data_dir=self._data_dir,
                    author="agent:chat",
                ),
            ),
            instructions=instructions,
            telemetry=False,
            markdown=True,
        )
        parts: list[str] = []
        error: str | None = None
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
        yield {
            "type": "done",
            "user_message_id": stored_user.id,
            "assistant_message_id": stored_answer.id,
        }
