"""Conversations kept in Honcho (`RALPH_MESSAGES_BACKEND=honcho`), through the official
`honcho-ai` SDK.

Mapping: the workspace is `RALPH_HONCHO_WORKSPACE`; each Ralph user is a Honcho peer whose
id is the user id with `_`, `.` and `@` written `_5f`, `_2e` and `_40` (Honcho ids allow
only letters, digits, `_` and `-`; ids without those characters are unchanged); the
assistant is one peer for all users (`RALPH_HONCHO_ASSISTANT_PEER`, default
`ralph_assistant`, which no user id can map to); each user's conversation with Ralph is one
session, `ralph-<peer id>`. A message keeps its time (`created_at`).

Every failure (Honcho down, slow beyond `RALPH_HONCHO_TIMEOUT_SECONDS`, an error answer) is
raised as `HistoryUnavailable`: callers decide what that means (a tool error for an agent,
a message kept in Ralph's table until Honcho is back).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from ralph.conversations.models import Message, Role

_ESCAPES = {"_": "_5f", ".": "_2e", "@": "_40"}
_UNESCAPES = {code: char for char, code in _ESCAPES.items()}


class HistoryUnavailable(Exception):
    """Honcho could not be reached or refused: conversation history is unavailable."""


def peer_id(user_id: str) -> str:
    """The Honcho peer of a Ralph user (reversible: `user_of_peer`)."""
    return re.sub(r"[_.@]", lambda match: _ESCAPES[match.group()], user_id)


def user_of_peer(peer: str) -> str:
    return re.sub(r"_(5f|2e|40)", lambda match: _UNESCAPES[match.group()], peer)


def session_id(user_id: str) -> str:
    return f"ralph-{peer_id(user_id)}"


class HonchoArchive:
    def __init__(
        self,
        url: str,
        workspace: str,
        *,
        api_key: str | None = None,
        timeout_seconds: float = 10.0,
        assistant_peer: str = "ralph_assistant",
    ) -> None:
        from honcho import Honcho  # pyright: ignore[reportMissingTypeStubs]

        self._client = Honcho(
            base_url=url,
            workspace_id=workspace,
            # a server without auth takes any key; the SDK wants one
            api_key=api_key or "none",
            timeout=timeout_seconds,
            max_retries=0,  # Ralph keeps what it could not store and retries it itself
        )
        self.assistant_peer = assistant_peer

    async def add(self, user_id: str, messages: list[tuple[Role, str, datetime]]) -> list[str]:
        """Store the user's messages (oldest first) in their session; their Honcho ids."""
        try:
            session = await self._client.aio.session(session_id(user_id))
            user = await self._client.aio.peer(peer_id(user_id))
            assistant = await self._client.aio.peer(self.assistant_peer)
            stored = await session.aio.add_messages(
                [
                    (user if role is Role.USER else assistant).message(content, created_at=at)
                    for role, content, at in messages
                ]
            )
        except Exception as exc:
            raise _unavailable(exc) from exc
        return [message.id for message in stored]

    async def recent(self, user_id: str, limit: int) -> list[Message]:
        """The user's newest `limit` messages, newest first."""
        try:
            session = await self._client.aio.session(session_id(user_id))
            page = await session.aio.messages(size=min(limit, 100), reverse=True)
            items: list[Any] = list(page.items)
        except Exception as exc:
            raise _unavailable(exc) from exc
        return [self._message(user_id, item) for item in items[:limit]]

    async def search(self, user_id: str, text: str, limit: int) -> list[Message]:
        """The user's messages matching `text` (Honcho's search), newest first."""
        try:
            session = await self._client.aio.session(session_id(user_id))
            found: list[Any] = await session.aio.search(text, limit=min(limit, 100))
        except Exception as exc:
            raise _unavailable(exc) from exc
        messages = [self._message(user_id, item) for item in found]
        return sorted(messages, key=lambda m: m.created_at, reverse=True)

    def _message(self, user_id: str, item: Any) -> Message:
        role = Role.ASSISTANT if item.peer_id == self.assistant_peer else Role.USER
        return Message(0, user_id, role, str(item.content), item.created_at, honcho_id=item.id)


def _unavailable(exc: Exception) -> HistoryUnavailable:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return HistoryUnavailable(f"Honcho: {type(exc).__name__}{': ' + first if first else ''}")
