"""Dolt versioning of memory (`RALPH_MEMORY_VERSIONING=dolt`): every change that lands in a
memory block is also a Dolt commit of the memory tables, with its author and why.

Two engines speak the same system functions and tables: doltlite (Dolt's version control
inside SQLite's API, preloaded into the process: `ralph.doltlite`) and a Dolt sql-server (the
MySQL protocol). `dolt_commit` ends the SQL transaction it runs in, so it is the last
statement of the transaction that made the change: the change and its commit land together.
Only `memory_blocks` and `memory_block_versions` are staged: runs, activity, proposals and
the other operational tables are never in a commit.

Ralph's own version history stays the API's source; a version's commit is found in
`dolt_diff_memory_block_versions` (the commit that added the version's row).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.db.dialects import backend

MEMORY_TABLES = ("memory_blocks", "memory_block_versions")


def signature(author: str) -> str:
    """A Dolt author ("Name <email>") for a Ralph author ("agent:nightly", "api", ...)."""
    local = re.sub(r"[^A-Za-z0-9._-]+", "-", author).strip("-") or "ralph"
    return f"{author} <{local}@ralph>"


@dataclass(frozen=True, slots=True)
class DoltCommit:
    hash: str
    author: str
    email: str
    date: str  # as Dolt prints it (UTC)
    message: str


class DoltUnavailable(RuntimeError):
    """The database cannot version memory."""


class DoltVersioning:
    def __init__(self, engine: AsyncEngine) -> None:
        verb = backend(engine).dolt_verb
        tables = ", ".join(f"'{name}'" for name in MEMORY_TABLES)
        self._add = text(f"{verb} dolt_add({tables})")
        self._commit = text(f"{verb} dolt_commit('-m', :message, '--author', :author)")

    @staticmethod
    async def check(engine: AsyncEngine) -> None:
        """Fail clearly when the database cannot version (not doltlite, not a Dolt server)."""
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT COUNT(*) FROM dolt_log"))
        except Exception as exc:
            raise DoltUnavailable(
                "RALPH_MEMORY_VERSIONING=dolt, but this database has no Dolt version control "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}). On SQLite: a "
                "database file created with doltlite loaded (set RALPH_MEMORY_VERSIONING=dolt "
                "in the environment of every ralph process; an existing plain SQLite file "
                "cannot be versioned); on MySQL: a Dolt sql-server."
            ) from None

    async def commit(self, conn: AsyncConnection, *, author: str, message: str) -> None:
        """Stage the memory tables and commit them. Ends `conn`'s transaction: call last."""
        await conn.execute(self._add)
        await conn.execute(self._commit, {"message": message, "author": signature(author)})

    @staticmethod
    async def version_commits(conn: AsyncConnection, user_id: str, label: str) -> dict[int, str]:
        """The commit that added each version of the block."""
        query = text(
            "SELECT to_version, to_commit FROM dolt_diff_memory_block_versions "
            "WHERE to_user_id = :user_id AND to_label = :label AND diff_type = 'added'"
        )
        rows = await conn.execute(query, {"user_id": user_id, "label": label})
        return {int(version): str(commit) for version, commit in rows}

    @staticmethod
    async def log(
        conn: AsyncConnection, user_id: str, label: str | None, limit: int
    ) -> list[DoltCommit]:
        """The commits of the user's memory (one block's with `label`), newest first."""
        where = "to_user_id = :user_id AND diff_type = 'added'"
        params: dict[str, Any] = {"user_id": user_id, "limit": limit}
        if label is not None:
            where += " AND to_label = :label"
            params["label"] = label
        query = text(
            "SELECT l.commit_hash, l.committer, l.email, l.date, l.message FROM dolt_log l "
            "JOIN (SELECT to_commit, MAX(to_created_at) AS at "
            f"FROM dolt_diff_memory_block_versions WHERE {where} GROUP BY to_commit) d "
            # Ralph's time of the version (Dolt's dates are whole seconds)
            "ON d.to_commit = l.commit_hash ORDER BY d.at DESC LIMIT :limit"
        )
        rows = await conn.execute(query, params)
        return [
            DoltCommit(h, name, email, str(date), message) for h, name, email, date, message in rows
        ]
