"""SQL storage for messages and user activity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, func, or_, select, union
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.conversations.models import Message, Role
from ralph.conversations.search import query_words, ranked, with_stems
from ralph.db.dialects import backend
from ralph.db.engine import one_statement, upsert
from ralph.db.group_commit import GroupCommit, GroupRead
from ralph.db.tables import messages, user_activity


@dataclass(frozen=True, slots=True)
class _Write:
    """A message to store (`role` set) or an activity to record (`role` None)."""

    user_id: str
    at: datetime
    role: Role | None = None
    content: str = ""


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
        self._writes = GroupCommit(engine, self._write)
        self._activity_reads = GroupRead(self._reads, self._read_activity)

    async def add_message(self, user_id: str, role: Role, content: str, at: datetime) -> Message:
        """Store a message; a user message also records activity, in the same transaction
        (shared with the writes that arrive with it: `GroupCommit`)."""
        stored = await self._writes.submit(_Write(user_id, at, role, content))
        assert isinstance(stored, Message)
        return stored

    async def _write(
        self, conn: AsyncConnection, writes: Sequence[_Write]
    ) -> list[Message | datetime | None]:
        """One batch of `GroupCommit`: the messages (ids in the writes' order), one upsert of
        each active user's latest time, and the latest activity of those who asked for it."""
        rows = [
            {"user_id": w.user_id, "role": w.role.value, "content": w.content, "created_at": w.at}
            for w in writes
            if w.role is not None
        ]
        ids: list[int] = []
        if rows and conn.dialect.insert_executemany_returning_sort_by_parameter_order:
            insert = messages.insert().returning(messages.c.id, sort_by_parameter_order=True)
            ids = [int(i) for i in (await conn.execute(insert, rows)).scalars()]
        else:  # no INSERT ... RETURNING of many rows in order (MySQL): a statement each
            for row in rows:
                key = (await conn.execute(messages.insert().values(**row))).inserted_primary_key
                ids.append(int(key[0]) if key else 0)
        active: dict[str, datetime] = {}
        for w in writes:
            if w.role in (None, Role.USER):
                active[w.user_id] = max(w.at, active.get(w.user_id, w.at))
        if active:  # in key order: concurrent batches (replicas) lock rows in one order
            await conn.execute(
                self._activity_upsert,
                [{"user_id": u, "last_message_at": at} for u, at in sorted(active.items())],
            )
        asked = sorted({w.user_id for w in writes if w.role is None})
        latest = dict(zip(asked, await self._read_activity(conn, asked), strict=True))
        made = iter(ids)
        return [
            latest.get(w.user_id)
            if w.role is None
            else Message(next(made), w.user_id, w.role, w.content, w.at)
            for w in writes
        ]

    @property
    def batches(self) -> int:
        """Transactions of messages and activity committed so far (each holds a batch)."""
        return self._writes.batches

    async def aclose(self) -> None:
        """Commit the writes queued so far and stop their writer (and the reader)."""
        await self._writes.aclose()
        await self._activity_reads.aclose()

    async def list_messages(
        self, user_id: str, *, limit: int = 50, before: int | None = None
    ) -> list[Message]:
        """The newest `limit` messages (older than message id `before`), newest first."""
        query = select(messages).where(messages.c.user_id == user_id)
        if before is not None:
            query = query.where(messages.c.id < before)
        query = query.order_by(messages.c.id.desc()).limit(limit)
        async with one_statement(self._reads) as conn:
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
        async with one_statement(self._reads) as conn:
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
        like = or_(
            *(
                func.lower(messages.c.content).like(f"%{_escape_like(word)}%", escape="\\")
                for word in words or [text.lower()]
            )
        )
        conditions = [like]
        if words:
            stems = [stemmed for word, stemmed in with_stems(words) if stemmed != word]
            conditions.append(self._backend.text_match(messages.c.content, words + stems))

        def newest(condition: ColumnElement[bool]) -> Select[Any]:
            return (
                select(messages)
                .where(messages.c.user_id == user_id, condition)
                .order_by(messages.c.id.desc())
                .limit(SEARCH_CANDIDATES)
            )

        if len(conditions) > 1 and self._backend.text_match_apart:
            found = union(*(select(newest(c).subquery()) for c in conditions)).subquery()
            query = select(found).order_by(found.c.id.desc()).limit(SEARCH_CANDIDATES)
        else:
            query = newest(or_(*conditions))
        async with one_statement(self._reads) as conn:
            rows = (await conn.execute(query)).all()
        return ranked([_message(r) for r in rows], words or [text.lower()], limit, matched=True)

    async def by_ids(self, ids: Sequence[int]) -> dict[int, Message]:
        """The messages of `ids` that are still here, by id."""
        if not ids:
            return {}
        query = select(messages).where(messages.c.id.in_(ids))
        async with one_statement(self._reads) as conn:
            rows = (await conn.execute(query)).all()
        return {int(r.id): _message(r) for r in rows}

    async def oldest(self, limit: int, user_id: str | None = None) -> list[Message]:
        """The oldest `limit` messages (of one user, or of all): with the Honcho backend, the
        messages waiting to be sent there."""
        query = select(messages)
        if user_id is not None:
            query = query.where(messages.c.user_id == user_id)
        query = query.order_by(messages.c.id).limit(limit)
        async with one_statement(self._reads) as conn:
            rows = (await conn.execute(query)).all()
        return [_message(r) for r in rows]

    async def delete_messages(self, ids: Sequence[int]) -> None:
        """Forget messages (Honcho has taken them)."""
        if not ids:
            return
        async with self._engine.begin() as conn:
            await conn.execute(messages.delete().where(messages.c.id.in_(list(ids))))

    async def record_activity(self, user_id: str, at: datetime) -> datetime | None:
        """Record that the user was active `at`; their latest activity (`at`, or a later
        time already stored)."""
        latest = await self._writes.submit(_Write(user_id, at))
        assert not isinstance(latest, Message)
        return latest

    async def last_activity(self, user_id: str) -> datetime | None:
        """The user's latest activity (reads that arrive together are one statement)."""
        return await self._activity_reads.submit(user_id)

    @staticmethod
    async def _read_activity(
        conn: AsyncConnection, user_ids: Sequence[str]
    ) -> list[datetime | None]:
        """The latest activity of each of `user_ids`, in their order, in one statement."""
        if not user_ids:
            return []
        query = select(user_activity.c.user_id, user_activity.c.last_message_at).where(
            user_activity.c.user_id.in_(sorted(set(user_ids)))
        )
        found = {row.user_id: row.last_message_at for row in await conn.execute(query)}
        return [found.get(user_id) for user_id in user_ids]
