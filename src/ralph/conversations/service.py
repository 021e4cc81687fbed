"""Messages and activity as the API and the agents' tools use them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from ralph.clock import Clock
from ralph.conversations.honcho import HistoryUnavailable, HonchoArchive
from ralph.conversations.models import HONCHO_REF, Message, Role
from ralph.conversations.search import query_words, ranked
from ralph.conversations.store import ConversationStore
from ralph.errors import InvalidInput

log = structlog.get_logger(__name__)

# how far ahead of the server's clock a reported activity time may be (clock skew)
MAX_ACTIVITY_AHEAD = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Cited:
    """A message a proposal's evidence names: the message, or why it cannot be shown."""

    ref: str
    message: Message | None = None
    note: str | None = None


class ConversationService:
    """Messages and activity. With a Honcho archive (`RALPH_MESSAGES_BACKEND=honcho`) messages
    live in Honcho: each is written to Ralph's table first (with the user's activity, in one
    transaction), sent to Honcho, and deleted here once Honcho has it. If Honcho is down it
    stays here, is still read (newest, after Honcho's), and `sync` sends it when Honcho is
    back: nothing is lost and the order is kept. Activity is always Ralph's."""

    def __init__(
        self, store: ConversationStore, clock: Clock, archive: HonchoArchive | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        self._listeners: list[Callable[[str, datetime], None]] = []
        self._archive = archive
        self._sending = asyncio.Lock()  # one sender at a time keeps each user's order

    @property
    def archived(self) -> bool:
        """Whether messages go to Honcho."""
        return self._archive is not None

    def on_activity(self, listener: Callable[[str, datetime], None]) -> None:
        """Call `listener(user_id, at)` after each activity recorded through this service
        (wakes a scheduler whose next idle episode it brings forward, and tells it when an
        episode started)."""
        self._listeners.append(listener)

    def _active(self, user_id: str, at: datetime) -> None:
        for listener in self._listeners:
            listener(user_id, at)

    async def add_message(
        self, user_id: str, role: Role, content: str, at: datetime | None = None
    ) -> Message:
        """Store a message (sent `at`, default now); a `user` message also records the
        user's activity."""
        message = await self._store.add_message(user_id, role, content, at or self._clock.now())
        if role is Role.USER:
            self._active(user_id, message.created_at)
        if self._archive is not None:
            sent = await self._send(user_id)
            if message.id in sent:
                return replace(message, id=0, honcho_id=sent[message.id])
        return message

    async def _send(self, user_id: str | None, batch: int = 100) -> dict[int, str]:
        """Send what waits in Ralph's table (one user's, or everyone's) to Honcho, oldest
        first, deleting what Honcho took: Ralph's id -> Honcho's. Stops at a failure."""
        assert self._archive is not None
        sent: dict[int, str] = {}
        async with self._sending:
            while waiting := await self._store.oldest(batch, user_id):
                by_user: dict[str, list[Message]] = {}
                for message in waiting:
                    by_user.setdefault(message.user_id, []).append(message)
                for user, messages in by_user.items():
                    try:
                        ids = await self._archive.add(
                            user, [(m.role, m.content, m.created_at) for m in messages]
                        )
                    except HistoryUnavailable as exc:
                        log.warning("honcho_unavailable", user_id=user, error=str(exc))
                        return sent
                    await self._store.delete_messages([m.id for m in messages])
                    sent.update(zip((m.id for m in messages), ids, strict=True))
                if len(waiting) < batch:
                    break
        return sent

    async def sync(self) -> int:
        """Send every message still kept here to Honcho; how many went (0 without Honcho)."""
        if self._archive is None:
            return 0
        return len(await self._send(None))

    async def messages(
        self, user_id: str, *, limit: int = 50, before: int | None = None, text: str | None = None
    ) -> list[Message]:
        """Newest first: those matching `text` by words (more of them first), or a page of
        messages older than `before`.
        With Honcho: HistoryUnavailable when it cannot answer."""
        if self._archive is not None:
            if before is not None:
                raise InvalidInput("before: paging by id is not available with Honcho")
            # what Honcho has not taken yet is newer than all it has
            waiting = await self._store.oldest(limit, user_id)
            if text is not None:
                found = await self._archive.search(user_id, text, limit)
                waiting = ranked(waiting, query_words(text) or [text.lower()], limit)
            else:
                found = await self._archive.recent(user_id, limit)
            return (list(reversed(waiting)) + found)[:limit]
        if text is not None:
            return await self._store.search_messages(user_id, text, limit=limit)
        return await self._store.list_messages(user_id, limit=limit, before=before)

    async def cited(self, evidence: Sequence[tuple[str, Sequence[str]]]) -> list[list[Cited]]:
        """For each (user, message references of a proposal's evidence: `message_ref`), the
        messages in its order, each with its text or a note saying why it cannot be shown.
        One read for all."""
        ids = {int(r) for _, refs in evidence for r in refs if r.isdigit()}
        found = await self._store.by_ids(sorted(ids))
        answer: list[list[Cited]] = []
        for user_id, refs in evidence:
            cited: list[Cited] = []
            for ref in refs:
                message = found.get(int(ref)) if ref.isdigit() else None
                if message is not None and message.user_id == user_id:
                    cited.append(Cited(ref, message))
                elif ref.startswith(HONCHO_REF):
                    cited.append(Cited(ref, note="kept in Honcho: not read back by id"))
                elif self._archive is not None:
                    cited.append(Cited(ref, note="moved to Honcho since, or deleted"))
                else:
                    cited.append(Cited(ref, note="deleted"))
            answer.append(cited)
        return answer

    async def since(
        self, user_id: str, since: datetime | None, until: datetime, limit: int
    ) -> list[Message]:
        """The newest `limit` messages after `since` (all, if None) up to `until`, oldest
        first: what happened since a task last ran for the user. With Honcho: from its
        newest `limit` (HistoryUnavailable when it cannot answer)."""
        if self._archive is not None:
            recent = await self.messages(user_id, limit=limit)
            return [
                m
                for m in reversed(recent)
                if m.created_at <= until and (since is None or m.created_at > since)
            ]
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
        latest = await self._store.record_activity(user_id, at)
        self._active(user_id, at)
        return latest

    async def last_activity(self, user_id: str) -> datetime | None:
        return await self._store.last_activity(user_id)
