"""Messages and activity as the API and the agents' tools use them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from ralph.clock import Clock
from ralph.conversations.models import Message, Role
from ralph.conversations.store import ConversationStore
from ralph.errors import InvalidInput

# how far ahead of the server's clock a reported activity time may be (clock skew)
MAX_ACTIVITY_AHEAD = timedelta(minutes=5)


class ConversationService:
    def __init__(self, store: ConversationStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._listeners: list[Callable[[datetime], None]] = []

    def on_activity(self, listener: Callable[[datetime], None]) -> None:
        """Call `listener(at)` after each activity recorded through this service (wakes a
        scheduler whose next idle episode it brings forward)."""
        self._listeners.append(listener)

    def _active(self, at: datetime) -> None:
        for listener in self._listeners:
            listener(at)

    async def add_message(
        self, user_id: str, role: Role, content: str, at: datetime | None = None
    ) -> Message:
        """Store a message (sent `at`, default now); a `user` message also records the
        user's activity."""
        message = await self._store.add_message(user_id, role, content, at or self._clock.now())
        if role is Role.USER:
            self._active(message.created_at)
        return message

    async def messages(
        self, user_id: str, *, limit: int = 50, before: int | None = None, text: str | None = None
    ) -> list[Message]:
        """Newest first: those containing `text`, or a page of messages older than `before`."""
        if text is not None:
            return await self._store.search_messages(user_id, text, limit=limit)
        return await self._store.list_messages(user_id, limit=limit, before=before)

    async def since(
        self, user_id: str, since: datetime | None, until: datetime, limit: int
    ) -> list[Message]:
        """The newest `limit` messages after `since` (all, if None) up to `until`, oldest
        first: what happened since a task last ran for the user."""
        return await self._store.messages_since(user_id, since, until, limit)

    async def record_activity(self, user_id: str, at: datetime | None = None) -> datetime | None:
        """The user was active `at` (default now; InvalidInput if later than the clock allows,
        which would keep the user from going idle until then). Returns the user's latest
        activity (an older `at` leaves it as it was)."""
        now = self._clock.now()
        at = at or now
        if at > now + MAX_ACTIVITY_AHEAD:
            raise InvalidInput(
                f"at: {at.isoformat()} is in the future (server time {now.isoformat()})"
            )
        await self._store.record_activity(user_id, at)
        self._active(at)
        return await self._store.last_activity(user_id)

    async def last_activity(self, user_id: str) -> datetime | None:
        return await self._store.last_activity(user_id)
