"""SQL storage for messages and user activity."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.conversations.models import Message, Role
from ralph.conversations.search import query_words, ranked, stem
from ralph.db.dialects import backend
from ralph.db.engine import upsert
from ralph.db.tables import messages, user_activity


def _message(row: Row[Any]) -> Message:
    return Message(row.id, row.user_id, Role(row.role), row.content, row.created_at)


# the newest matching messages a search ranks (a user's history may be long)
SEARCH_CANDIDATES = 1000


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ConversationStore:
    """Messages and `last_message_at` per user.

    Activity only moves forward: recording an older time than the stored one changes nothing,
    so out-of-order writers cannot make a user look idle.
    """

    def __init__(self, engine: AsyncEngine, reads: AsyncEngine | None = None) -> None:
        self._engine = engine
        # transactions that only read (SQLite: see ralph.db.engine.create_read_engine)
        self._reads = reads or engine
        self._backend = backend(engine)
        greatest = self._backend.greatest
        self._activity_upsert = upsert(
            engine,
            user_activity,
            lambda proposed: {
                "last_message_at": greatest(
                    user_activity.c.last_message_at, proposed.last_message_at
                )
            },
        )

    async def add_message(self, user_id: str, role: Role, content: str, at: datetime) -> Message:
        """Store a message; a user message also records activity, in the same transaction."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                messages.insert().values(
                    user_id=user_id, role=role.value, content=content, created_at=at
                )
            )
            if role is Role.USER:
                await self._record(conn, user_id, at)
        (message_id,) = result.inserted_primary_key or (0,)
        return Message(int(message_id), user_id, role, content, at)

    async def list_messages(
        self, user_id: str, *, limit: int = 50, before: int | None = None
    ) -> list[Message]:
        """The newest `limit` messages (older than message id `before`), newest first."""
        query = select(messages).where(messages.c.user_id == user_id)
        if before is not None:
            query = query.where(messages.c.id < before)
        query = query.order_by(messages.c.id.desc()).limit(limit)
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_message(r) for r in rows]

    async def messages_since(
        self, user_id: str, since: datetime | None, until: datetime, limit: int
    ) -> list[Message]:
        """The newest `limit` of the user's messages after `since` (all, if None) and at or
        before `until`, oldest first."""
        query = select(messages).where(
            messages.c.user_id == user_id, messages.c.created_at <= until
        )
        if since is not None:
            query = query.where(messages.c.created_at > since)
        query = query.order_by(messages.c.id.desc()).limit(limit)
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_message(r) for r in reversed(rows)]

    async def search_messages(self, user_id: str, text: str, *, limit: int = 20) -> list[Message]:
        """The user's messages holding any word of `text`, those with more of its words
        first, then the newest (`ralph.conversations.search`). A word is found by the
        database's full-text index (stemmed where it stems: "cats" finds "cat") or as a
        substring, case-insensitive (parts of words, and what an index skips: short words,
        symbols); `text` without a word that can find anything ("the", "?") is matched as
        it is. Ranks the newest `SEARCH_CANDIDATES` matches."""
        words = query_words(text)
        matches: list[ColumnElement[bool]] = [
            func.lower(messages.c.content).like(f"%{_escape_like(word)}%", escape="\\")
            for word in words or [text.lower()]
        ]
        if words:
            stems = [stem(word) for word in words if stem(word) != word]
            matches.append(self._backend.text_match(messages.c.content, words + stems))
        query = (
            select(messages)
            .where(messages.c.user_id == user_id, or_(*matches))
            .order_by(messages.c.id.desc())
            .limit(SEARCH_CANDIDATES)
        )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return ranked([_message(r) for r in rows], words or [text.lower()], limit, matched=True)

    async def by_ids(self, ids: Sequence[int]) -> dict[int, Message]:
        """The messages of `ids` that are still here, by id."""
        if not ids:
            return {}
        query = select(messages).where(messages.c.id.in_(ids))
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {int(r.id): _message(r) for r in rows}

    async def oldest(self, limit: int, user_id: str | None = None) -> list[Message]:
        """The oldest `limit` messages (of one user, or of all): with the Honcho backend, the
        messages waiting to be sent there."""
        query = select(messages)
        if user_id is not None:
            query = query.where(messages.c.user_id == user_id)
        query = query.order_by(messages.c.id).limit(limit)
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_message(r) for r in rows]

    async def delete_messages(self, ids: Sequence[int]) -> None:
        """Forget messages (Honcho has taken them)."""
        if not ids:
            return
        async with self._engine.begin() as conn:
            await conn.execute(messages.delete().where(messages.c.id.in_(list(ids))))

    async def record_activity(self, user_id: str, at: datetime) -> None:
        async with self._engine.begin() as conn:
            await self._record(conn, user_id, at)

    async def _record(self, conn: AsyncConnection, user_id: str, at: datetime) -> None:
        await conn.execute(self._activity_upsert, {"user_id": user_id, "last_message_at": at})

    async def last_activity(self, user_id: str) -> datetime | None:
        query = select(user_activity.c.last_message_at).where(user_activity.c.user_id == user_id)
        async with self._reads.connect() as conn:
            return (await conn.execute(query)).scalar()
