"""Console sessions ended by logging out (`revoked_sessions`): a session cookie is valid by
its signature alone, so logging out records the signature until the session would have
expired; every replica reads the same table."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.db.engine import insert_ignore
from ralph.db.tables import revoked_sessions


class RevokedSessions:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # revoked signatures seen here: a revocation is never undone
        self._known: set[str] = set()

    async def revoke(self, signature: str, expires_at: datetime, now: datetime) -> None:
        """End the session with this signature; forget those past their expiry."""
        async with self._engine.begin() as conn:
            await conn.execute(
                insert_ignore(self._engine, revoked_sessions).values(
                    signature=signature, expires_at=expires_at
                )
            )
            await conn.execute(delete(revoked_sessions).where(revoked_sessions.c.expires_at < now))
        self._known.add(signature)

    async def is_revoked(self, signature: str) -> bool:
        if signature in self._known:
            return True
        query = select(revoked_sessions.c.signature).where(
            revoked_sessions.c.signature == signature
        )
        async with self._engine.connect() as conn:
            found = (await conn.execute(query)).first() is not None
        if found:
            self._known.add(signature)
        return found
