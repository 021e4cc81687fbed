"""SQL storage for memory blocks, their versions and proposals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, and_, bindparam, func, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.authors import EXPIRER, SUPERSEDER, Author
from ralph.db.dialects import backend
from ralph.db.retry import retrying
from ralph.db.tables import memory_block_versions, memory_blocks, proposals
from ralph.errors import Conflict, NotFound
from ralph.memory.models import (
    Block,
    BlockVersion,
    Evidence,
    Proposal,
    ProposalKind,
    ProposalStatus,
)
from ralph.memory.versioning import DoltCommit, DoltVersioning
from ralph.webhooks.store import PROPOSAL_DECIDED, Outbox

# Computes the new (title, body) from the current block, or raises Conflict.
EditFn = Callable[[Block | None], tuple[str, str]]


# The row types' fields are named after their columns.


def _block(m: RowMapping) -> Block:
    return Block(**m)


def _version(m: RowMapping) -> BlockVersion:
    values: dict[str, Any] = dict(m)
    values["deleted"] = bool(m["deleted"])
    return BlockVersion(**values)


def _proposal(m: RowMapping) -> Proposal:
    values: dict[str, Any] = dict(m)
    del values["idempotency_key"]  # storage detail, not part of a Proposal
    values["kind"] = ProposalKind(m["kind"])
    values["status"] = ProposalStatus(m["status"])
    values["evidence"] = Evidence.from_json(m["evidence"])
    return Proposal(**values)


def _supersede(successor: str, now: datetime) -> Any:
    """UPDATE marking pending proposals (but `successor`) superseded by `successor`; the
    caller adds which ones."""
    return (
        update(proposals)
        .where(proposals.c.status == ProposalStatus.PENDING.value, proposals.c.id != successor)
        .values(
            status=ProposalStatus.SUPERSEDED.value,
            decided_at=now,
            decided_by=str(SUPERSEDER),
            superseded_by=successor,
            idempotency_key=None,
        )
    )


# what reviewers corrected: rejected, or approved with their own version
_CORRECTED = or_(
    proposals.c.status == ProposalStatus.REJECTED.value,
    and_(proposals.c.status == ProposalStatus.APPROVED.value, proposals.c.edited.is_(True)),
)

# read for every agent run: built once (building costs more than executing it on SQLite)
_LIST_BLOCKS = (
    select(memory_blocks)
    .where(memory_blocks.c.user_id == bindparam("b_user"))
    .order_by(memory_blocks.c.label)
)


class MemoryStore:
    """Blocks, versions and proposals in SQL.

    Every write is one transaction that reads the block with a row lock (SQLite: the whole
    database, taken at BEGIN) and appends a version whose number is part of the primary key, so
    two concurrent writers can never both produce version N: the loser retries from the start
    and sees the winner's change.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        reads: AsyncEngine | None = None,
        outbox: Outbox | None = None,
        versioning: DoltVersioning | None = None,
    ) -> None:
        self._engine = engine
        # transactions that only read (SQLite: see ralph.db.engine.create_read_engine)
        self._reads = reads or engine
        self._lock_rows = backend(engine).lock_rows
        self._outbox = outbox or Outbox(enabled=False)
        # with Dolt versioning, each change's transaction ends with its Dolt commit
        self.versioning = versioning

    # --- blocks ---------------------------------------------------------------------------

    async def list_blocks(self, user_id: str) -> list[Block]:
        async with self._reads.connect() as conn:
            rows = (await conn.execute(_LIST_BLOCKS, {"b_user": user_id})).mappings().all()
        return [_block(r) for r in rows]

    async def get_block(self, user_id: str, label: str) -> Block | None:
        async with self._reads.connect() as conn:
            return await self._get_block(conn, user_id, label, lock=False)

    async def get_blocks(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Block]:
        """The blocks of these (user, label) pairs that exist, in one read."""
        found: dict[tuple[str, str], Block] = {}
        wanted = sorted(set(keys))
        for start in range(0, len(wanted), 200):
            chunk = wanted[start : start + 200]
            query = select(memory_blocks).where(
                tuple_(memory_blocks.c.user_id, memory_blocks.c.label).in_(chunk)
            )
            async with self._reads.connect() as conn:
                for row in (await conn.execute(query)).mappings():
                    found[(row["user_id"], row["label"])] = _block(row)
        return found

    async def _get_block(
        self, conn: AsyncConnection, user_id: str, label: str, *, lock: bool
    ) -> Block | None:
        query = select(memory_blocks).where(
            memory_blocks.c.user_id == user_id, memory_blocks.c.label == label
        )
        if lock and self._lock_rows:
            query = query.with_for_update()
        row = (await conn.execute(query)).mappings().first()
        return _block(row) if row else None

    async def _version(self, conn: AsyncConnection, author: str, message: str) -> None:
        """The change's Dolt commit, if versioning is on: the transaction's last statement."""
        if self.versioning is not None:
            await self.versioning.commit(conn, author=author, message=message)

    async def version_commits(self, user_id: str, label: str) -> dict[int, str]:
        """Each version's Dolt commit (empty without versioning)."""
        if self.versioning is None:
            return {}
        async with self._reads.connect() as conn:
            return await self.versioning.version_commits(conn, user_id, label)

    async def dolt_log(self, user_id: str, label: str | None, limit: int) -> list[DoltCommit]:
        if self.versioning is None:
            raise Conflict("memory versioning is off: set RALPH_MEMORY_VERSIONING=dolt")
        async with self._reads.connect() as conn:
            return await self.versioning.log(conn, user_id, label, limit)

    async def _last_version(self, conn: AsyncConnection, user_id: str, label: str) -> int:
        query = select(func.max(memory_block_versions.c.version)).where(
            memory_block_versions.c.user_id == user_id, memory_block_versions.c.label == label
        )
        return int((await conn.execute(query)).scalar() or 0)

    async def write_block(
        self,
        user_id: str,
        label: str,
        edit: EditFn,
        *,
        author: str,
        now: datetime,
        expected_version: int | None = None,
        proposal_id: str | None = None,
        why: str = "put",
    ) -> Block:
        """Apply `edit` to the block's current content as a new version, atomically.

        `expected_version`: the version the caller last saw (0 = "must not exist"); a different
        current version raises Conflict with `current_version`. `edit` may raise Conflict too;
        nothing is written then. `why` says what the change is, for a Dolt commit's message.
        """

        async def attempt() -> Block:
            async with self._engine.begin() as conn:
                block = await self._write(
                    conn, user_id, label, edit, author, now, expected_version, proposal_id
                )
                await self._version(conn, author, f"{why} {user_id}/{label} v{block.version}")
                return block

        return await retrying(attempt)

    async def _write(
        self,
        conn: AsyncConnection,
        user_id: str,
        label: str,
        edit: EditFn,
        author: str,
        now: datetime,
        expected_version: int | None,
        proposal_id: str | None,
    ) -> Block:
        current = await self._get_block(conn, user_id, label, lock=True)
        current_version = current.version if current else 0
        if expected_version is not None and expected_version != current_version:
            raise Conflict(
                f"block '{label}' is at version {current_version}, not {expected_version}",
                current_version=current_version,
            )
        title, body = edit(current)
        # a block's row holds its newest version; only a new or deleted one needs the history
        last = current.version if current else await self._last_version(conn, user_id, label)
        version = last + 1
        await conn.execute(
            memory_block_versions.insert().values(
                user_id=user_id,
                label=label,
                version=version,
                title=title,
                body=body,
                deleted=False,
                author=author,
                proposal_id=proposal_id,
                created_at=now,
            )
        )
        if current is None:
            await conn.execute(
                memory_blocks.insert().values(
                    user_id=user_id,
                    label=label,
                    title=title,
                    body=body,
                    version=version,
                    created_at=now,
                    updated_at=now,
                )
            )
            return Block(user_id, label, title, body, version, now, now)
        await conn.execute(
            update(memory_blocks)
            .where(memory_blocks.c.user_id == user_id, memory_blocks.c.label == label)
            .values(title=title, body=body, version=version, updated_at=now)
        )
        return Block(user_id, label, title, body, version, current.created_at, now)

    async def delete_block(
        self,
        user_id: str,
        label: str,
        *,
        author: str,
        now: datetime,
        expected_version: int | None = None,
    ) -> int:
        """Delete the block, keeping its history (a tombstone version). Returns that version."""

        async def attempt() -> int:
            async with self._engine.begin() as conn:
                current = await self._get_block(conn, user_id, label, lock=True)
                if current is None:
                    raise NotFound(f"block '{label}' not found for user '{user_id}'")
                if expected_version is not None and expected_version != current.version:
                    raise Conflict(
                        f"block '{label}' is at version {current.version}, not {expected_version}",
                        current_version=current.version,
                    )
                version = await self._last_version(conn, user_id, label) + 1
                await conn.execute(
                    memory_block_versions.insert().values(
                        user_id=user_id,
                        label=label,
                        version=version,
                        title=current.title,
                        body="",
                        deleted=True,
                        author=author,
                        created_at=now,
                    )
                )
                await conn.execute(
                    memory_blocks.delete().where(
                        memory_blocks.c.user_id == user_id, memory_blocks.c.label == label
                    )
                )
                await self._version(conn, author, f"delete {user_id}/{label} v{version}")
                return version

        return await retrying(attempt)

    async def history(self, user_id: str, label: str) -> list[BlockVersion]:
        """Every version of the block, newest first (tombstones of deletions included)."""
        query = (
            select(memory_block_versions)
            .where(
                memory_block_versions.c.user_id == user_id,
                memory_block_versions.c.label == label,
            )
            .order_by(memory_block_versions.c.version.desc())
        )
        async with self._reads.connect() as conn:
            return [_version(r) for r in (await conn.execute(query)).mappings().all()]

    async def get_version(self, user_id: str, label: str, version: int) -> BlockVersion | None:
        query = select(memory_block_versions).where(
            memory_block_versions.c.user_id == user_id,
            memory_block_versions.c.label == label,
            memory_block_versions.c.version == version,
        )
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return _version(row) if row else None

    # --- proposals ------------------------------------------------------------------------

    async def insert_proposal(self, values: dict[str, Any]) -> tuple[Proposal, bool]:
        """Insert a proposal unless a pending one with the same `idempotency_key` exists.

        A new pending proposal from a task (author `agent:<task>`) supersedes the pending ones
        the same task made for the same block in other runs, in the same transaction: a
        nightly task leaves one edit of a block to review, not thirty (the edits of one run
        are all kept: an agent may append twice). Returns the stored proposal and whether it
        was created by this call.
        """

        async def attempt() -> tuple[Proposal, bool]:
            async with self._engine.begin() as conn:
                # a plain INSERT: a duplicate key is the only error expected here, and MySQL's
                # INSERT IGNORE would also turn a data error (a value too long) into a warning
                key = values.get("idempotency_key")
                try:
                    async with conn.begin_nested():
                        await conn.execute(proposals.insert().values(**values))
                    created = True
                except IntegrityError:
                    if key is None:
                        raise
                    created = False
                from_task = Author.parse(str(values["author"])).supersedes_its_own
                if created and from_task and values["status"] == ProposalStatus.PENDING.value:
                    await conn.execute(
                        _supersede(values["id"], values["created_at"]).where(
                            proposals.c.user_id == values["user_id"],
                            proposals.c.label == values["label"],
                            proposals.c.author == values["author"],
                            proposals.c.run_id.is_distinct_from(values["run_id"]),
                        )
                    )
                if created or key is None:
                    where = proposals.c.id == values["id"]
                else:
                    where = proposals.c.idempotency_key == key
                row = (await conn.execute(select(proposals).where(where))).mappings().one()
            return _proposal(row), created

        # the superseding UPDATE takes InnoDB range locks: two proposals of one user made at
        # once (parallel tool calls) can deadlock, and the loser is run again
        return await retrying(attempt)

    async def get_proposal(self, proposal_id: str) -> Proposal | None:
        async with self._reads.connect() as conn:
            row = (
                (await conn.execute(select(proposals).where(proposals.c.id == proposal_id)))
                .mappings()
                .first()
            )
        return _proposal(row) if row else None

    async def list_proposals(
        self,
        user_id: str | None,
        *,
        status: ProposalStatus | None = None,
        run_id: str | None = None,
        label: str | None = None,
        author: str | None = None,
        limit: int = 100,
        decided_since: datetime | None = None,
        corrected: bool = False,
    ) -> list[Proposal]:
        """Newest first; `user_id` None lists every user's. `corrected`: only those a
        reviewer rejected or approved with edits."""
        query = select(proposals)
        if corrected:
            query = query.where(_CORRECTED)
        if decided_since is not None:
            query = query.where(proposals.c.decided_at >= decided_since)
        for column, value in (
            (proposals.c.user_id, user_id),
            (proposals.c.run_id, run_id),
            (proposals.c.label, label),
            (proposals.c.author, author),
        ):
            if value is not None:
                query = query.where(column == value)
        if status is not None:
            query = query.where(proposals.c.status == status.value)
        query = query.order_by(proposals.c.created_at.desc(), proposals.c.id).limit(limit)
        async with self._reads.connect() as conn:
            return [_proposal(r) for r in (await conn.execute(query)).mappings().all()]

    async def corrected_users(self, author: str, decided_since: datetime) -> set[str]:
        """The users with a proposal of `author` that a reviewer rejected or approved with
        edits since then."""
        query = (
            select(proposals.c.user_id)
            .where(
                _CORRECTED, proposals.c.author == author, proposals.c.decided_at >= decided_since
            )
            .distinct()
        )
        async with self._reads.connect() as conn:
            return set((await conn.execute(query)).scalars().all())

    async def expire(self, created_before: datetime, now: datetime) -> int:
        """Pending proposals created before `created_before` end `expired`; returns how many.
        A conditional write: replicas sweeping at once expire each proposal once."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(proposals)
                .where(
                    proposals.c.status == ProposalStatus.PENDING.value,
                    proposals.c.created_at < created_before,
                )
                .values(
                    status=ProposalStatus.EXPIRED.value,
                    decided_at=now,
                    decided_by=str(EXPIRER),
                    idempotency_key=None,
                )
            )
        return result.rowcount

    async def pending_ids_of_run(self, run_id: str) -> list[str]:
        """The ids of the run's pending proposals, oldest first."""
        query = (
            select(proposals.c.id)
            .where(
                proposals.c.run_id == run_id,
                proposals.c.status == ProposalStatus.PENDING.value,
            )
            .order_by(proposals.c.created_at, proposals.c.id)
        )
        async with self._reads.connect() as conn:
            return list((await conn.execute(query)).scalars().all())

    async def decide(
        self,
        proposal_id: str,
        *,
        approve: bool,
        comment: str | None,
        now: datetime,
        edit_for: Callable[[Proposal], EditFn],
        by: str = "api",
        conflict_stays_pending: bool = False,
        revised: str | None = None,
    ) -> Proposal:
        """Approve or reject a pending proposal (decided `by`), atomically with the block
        change. `revised`: the reviewer's version of the change's text (the new body, the
        replacement or the appended text), applied instead of the author's, which the
        proposal keeps (`edited`, `applied_text`).

        Approval applies `edit_for(proposal)` as a new block version in the same transaction; if
        that edit raises Conflict, the proposal is stored as `conflict`, the block is untouched,
        and Conflict is raised. A proposal that is not pending raises Conflict and changes
        nothing. After an approval, pending whole-body proposals on the same block that were
        based on an older version are marked `superseded`.
        """

        async def attempt() -> tuple[Proposal, Conflict | None]:
            async with self._engine.begin() as conn:
                query = select(proposals).where(proposals.c.id == proposal_id)
                if self._lock_rows:
                    query = query.with_for_update()
                row = (await conn.execute(query)).mappings().first()
                if row is None:
                    raise NotFound(f"proposal '{proposal_id}' not found")
                proposal = _proposal(row)
                if proposal.status is ProposalStatus.PREVIEW:
                    raise Conflict(
                        f"proposal '{proposal_id}' is a preview from a dry run: it can never "
                        "be approved or rejected",
                        status=proposal.status.value,
                    )
                if proposal.status is not ProposalStatus.PENDING:
                    raise Conflict(
                        f"proposal '{proposal_id}' is already {proposal.status.value}",
                        status=proposal.status.value,
                    )
                if not approve:
                    return await self._set_status(
                        conn, proposal, ProposalStatus.REJECTED, comment, now, None, by
                    ), None
                applied = proposal if revised is None else proposal.with_text(revised)
                try:
                    block = await self._write(
                        conn,
                        proposal.user_id,
                        proposal.label,
                        edit_for(applied),
                        proposal.author,
                        now,
                        None,
                        proposal.id,
                    )
                except Conflict as conflict:
                    if conflict_stays_pending:
                        raise  # the transaction rolls back: the proposal stays pending
                    stored = await self._set_status(
                        conn, proposal, ProposalStatus.CONFLICT, comment, now, None, by
                    )
                    return stored, conflict
                # whole-body rewrites of an older version can no longer apply
                await conn.execute(
                    _supersede(proposal.id, now).where(
                        proposals.c.user_id == proposal.user_id,
                        proposals.c.label == proposal.label,
                        proposals.c.kind == ProposalKind.BODY.value,
                        proposals.c.base_version < block.version,
                    )
                )
                stored = await self._set_status(
                    conn,
                    proposal,
                    ProposalStatus.APPROVED,
                    comment,
                    now,
                    block.version,
                    by,
                    revised=revised,
                )
                message = (
                    f"approve proposal {proposal.id}: {proposal.kind.value} "
                    f"{proposal.user_id}/{proposal.label} v{block.version}\n\n"
                    f"reason: {proposal.reason}\napproved by: {by}"
                    + (" (edited)" if revised is not None else "")
                    + (f"\ncomment: {comment}" if comment else "")
                )
                await self._version(conn, proposal.author, message)
                return stored, None

        stored, conflict = await retrying(attempt)
        self._outbox.added()
        if conflict is not None:
            raise Conflict(str(conflict), status=stored.status.value, proposal_id=stored.id)
        return stored

    async def _set_status(
        self,
        conn: AsyncConnection,
        proposal: Proposal,
        status: ProposalStatus,
        comment: str | None,
        now: datetime,
        applied_version: int | None,
        by: str,
        *,
        revised: str | None = None,
    ) -> Proposal:
        """Decide the proposal, and record `proposal.decided` for webhooks, in `conn`."""
        edited = {"edited": revised is not None, "applied_text": revised}
        await conn.execute(
            update(proposals)
            .where(proposals.c.id == proposal.id)
            .values(
                status=status.value,
                comment=comment,
                decided_at=now,
                decided_by=by,
                applied_version=applied_version,
                idempotency_key=None,  # decided: the same change may be proposed again
                **edited,
            )
        )
        decided = replace(
            proposal,
            status=status,
            comment=comment,
            decided_at=now,
            decided_by=by,
            applied_version=applied_version,
            **edited,
        )
        event = {
            "proposal_id": decided.id,
            "user_id": decided.user_id,
            "label": decided.label,
            "status": decided.status.value,
            "decided_by": by,
            "comment": comment,
            "author": decided.author,
            "run_id": decided.run_id,
            "applied_version": applied_version,
            "edited": revised is not None,
        }
        await self._outbox.add(conn, PROPOSAL_DECIDED, event, now)
        return decided
