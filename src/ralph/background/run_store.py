"""SQL storage for runs and their per-user rows, and the (task, user) locks: the only module
that writes them, so every change of a run's or a user's status is made here."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.background.models import (
    FINISHED_RUN,
    NO_RETRIES,
    REASON_OF_STATUS,
    USER_TRANSITIONS,
    WAITING_USER,
    Attempt,
    NextState,
    RetryPolicy,
    RunStatus,
    TaskDefinition,
    TaskRun,
    TriggerType,
    UserResult,
    UserStatus,
    final_run_status,
    jitter_offset,
    next_state,
    retry_draw,
    unit_status,
    user_sources,
)
from ralph.clock import utc
from ralph.db.engine import insert_ignore, insert_rows
from ralph.db.tables import proposals, task_run_users, task_runs, task_user_locks, unit_attempts
from ralph.errors import Conflict, NotFound
from ralph.reasons import EndReason
from ralph.webhooks.store import PROPOSALS_PENDING, RUN_FINISHED, Outbox

CHUNK = 1000
# a (run, user) row as created: pending, nothing counted yet
_NEW_USER_COLUMNS = (
    "run_id",
    "user_id",
    "position",
    "status",
    "attempts",
    "turns_used",
    "tool_calls",
    "proposals_created",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "jitter_seconds",
    "next_attempt_at",
)
_NEW_USER_VALUES = (UserStatus.PENDING.value, 0, 0, 0, 0, 0, 0, 0)
_WAITING = [status.value for status in WAITING_USER]
# those summed over a user's attempts in its row (every attempt's tokens count for budgets)
_SUMMED = ("input_tokens", "output_tokens", "total_tokens")
# an attempt's counts, as unit_attempts' columns
_ATTEMPT_COLUMNS = ("turns_used", "tool_calls", "proposals_created", *_SUMMED)
# slot key of a run that re-runs the unfinished users of the run named after it
RERUN_PREFIX = "rerun:"


@dataclass(frozen=True)
class UnitEnd:
    """How an attempt of a (run, user) unit ended: why, its error, and what it did
    (`figures`, task_run_users' columns; empty when it ended without running: a lost worker,
    a user never started). `retry_after`: seconds the provider asked to wait."""

    reason: EndReason
    error: str | None = None
    figures: Mapping[str, Any] = field(default_factory=dict[str, Any])
    retry_after: float | None = None


@dataclass(frozen=True)
class UserStart:
    """What `RunStore.start_user` did: `started`, or not, with the run holding the user's lock
    when the user was skipped for it (None: the user was no longer pending), and whether the
    run is a dry run (read with the claim: once a user is claimed, nothing may need the
    database before the agent runs, or an outage there would leave the user running)."""

    started: bool
    held_by: str | None = None
    dry_run: bool = False
    # tokens the user's earlier attempts in the run spent (its budget counts them)
    spent: int = 0


async def _dry_run(conn: AsyncConnection, run_id: str) -> bool:
    query = select(task_runs.c.dry_run).where(task_runs.c.id == run_id)
    return bool((await conn.execute(query)).scalar())


async def _started(conn: AsyncConnection, unit: dict[str, Any]) -> UserStart:
    """A claimed unit's start: whether its run is a dry run, and what the user's earlier
    attempts spent (one read, in the claim's transaction)."""
    row = (await conn.execute(_STARTED, unit)).one()
    return UserStart(started=True, dry_run=bool(row.dry_run), spent=int(row.total_tokens))


def _run(row: RowMapping, counts: dict[str, int]) -> TaskRun:
    return TaskRun(
        id=row["id"],
        task_name=row["task_name"],
        trigger_type=TriggerType(row["trigger_type"]),
        status=RunStatus(row["status"]),
        slot_at=row["slot_at"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        heartbeat_at=row["heartbeat_at"],
        owner=row["owner"],
        cancel_requested=bool(row["cancel_requested"]),
        user_total=row["user_total"],
        counts=counts,
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        total_tokens=row["total_tokens"],
        error=row["error"],
        rerun_of=_rerun_of(row["slot_key"]),
        retry_of=row["retry_of"],
        cost_usd=row["cost_usd"],
        dry_run=bool(row["dry_run"]),
    )


def _rerun_of(slot_key: str | None) -> str | None:
    if slot_key is None or not slot_key.startswith(RERUN_PREFIX):
        return None
    return slot_key.removeprefix(RERUN_PREFIX)


def _user(row: RowMapping | dict[str, Any]) -> UserResult:
    # UserResult's fields are task_run_users' columns
    values: dict[str, Any] = dict(row)
    values["status"] = UserStatus(row["status"])
    return UserResult(**values)


# Statements every (run, user) unit executes, built once: building one costs more than
# executing it on SQLite. Parameters are named b_* (SET clause names are taken).
_THIS_USER = and_(
    task_run_users.c.run_id == bindparam("b_run"),
    task_run_users.c.user_id == bindparam("b_user"),
)
_CLAIM_USER = (
    update(task_run_users)
    .where(_THIS_USER, task_run_users.c.status.in_(user_sources(UserStatus.RUNNING)))
    .values(
        status=UserStatus.RUNNING.value,
        started_at=bindparam("b_now"),
        attempts=task_run_users.c.attempts + 1,
        next_attempt_at=None,
    )
)
_SKIP_USER = (
    update(task_run_users)
    .where(_THIS_USER, task_run_users.c.status.in_(user_sources(UserStatus.SKIPPED)))
    .values(
        status=UserStatus.SKIPPED.value,
        started_at=None,  # it never started: undo the claim
        attempts=task_run_users.c.attempts - 1,
        completed_at=bindparam("b_now"),
        error=bindparam("b_error"),
    )
)
_UPDATE_USER = update(task_run_users).where(_THIS_USER)  # SET from the parameters given
# a unit's end, conditional on the status it was read in
_END_USER = {
    source: _UPDATE_USER.where(task_run_users.c.status == source.value)
    for source in (UserStatus.RUNNING, *WAITING_USER)
}
_READ_USER = select(
    task_run_users.c.status,
    task_run_users.c.attempts,
    task_run_users.c.started_at,
    task_run_users.c.input_tokens,
    task_run_users.c.output_tokens,
    task_run_users.c.total_tokens,
    task_run_users.c.cost_usd,
).where(_THIS_USER)
_STARTED = (
    select(task_runs.c.dry_run, task_run_users.c.total_tokens)
    .select_from(task_run_users.join(task_runs, task_runs.c.id == task_run_users.c.run_id))
    .where(_THIS_USER)
)
_LOCK_HOLDER = select(task_user_locks.c.run_id).where(
    task_user_locks.c.task_name == bindparam("b_task"),
    task_user_locks.c.user_id == bindparam("b_user"),
)
_RELEASE_LOCK = delete(task_user_locks).where(
    task_user_locks.c.task_name == bindparam("b_task"),
    task_user_locks.c.user_id == bindparam("b_user"),
    task_user_locks.c.run_id == bindparam("b_run"),
)


def _check_transition(source: UserStatus, target: UserStatus) -> None:
    if target not in USER_TRANSITIONS.get(source, frozenset()):
        raise ValueError(f"a user cannot go from {source.value} to {target.value}")


class RunStore:
    """Runs and their per-user rows: one row per (run, user), never a JSON blob."""

    def __init__(
        self, engine: AsyncEngine, reads: AsyncEngine | None = None, outbox: Outbox | None = None
    ) -> None:
        self._engine = engine
        # transactions that only read (SQLite: see ralph.db.engine.create_read_engine)
        self._reads = reads or engine
        self._take_lock = insert_ignore(engine, task_user_locks)
        self._outbox = outbox or Outbox(enabled=False)

    async def create(
        self,
        task: TaskDefinition,
        trigger: TriggerType,
        user_ids: Sequence[str],
        now: datetime,
        *,
        slot_key: str | None = None,
        slot_at: datetime | None = None,
        status: RunStatus = RunStatus.PENDING,
        skipped: Mapping[str, str] | None = None,
        dry_run: bool = False,
        continues: str | None = None,
        retry_of: str | None = None,
    ) -> str | None:
        """Create a run with one pending row per user and return its id.

        With `slot_key`, the (task, slot_key) pair is claimed: if another caller (in any
        process) created that run first, nothing is written and None is returned. Users in
        `skipped` (some of `user_ids`) are recorded as skipped at once, with its reason.
        """
        async with self._engine.begin() as conn:
            return await self.create_in(
                conn,
                task,
                trigger,
                user_ids,
                now,
                slot_key=slot_key,
                slot_at=slot_at,
                status=status,
                skipped=skipped,
                dry_run=dry_run,
                continues=continues,
                retry_of=retry_of,
            )

    async def _carry_attempts(
        self, conn: AsyncConnection, old_run: str, new_run: str, user_ids: Sequence[str]
    ) -> None:
        """The users of `new_run` keep the attempts they had in `old_run`, and the time their
        next attempt was due (a retry waiting when the run was interrupted stays at its
        time)."""
        for start in range(0, len(user_ids), CHUNK):
            query = select(
                task_run_users.c.user_id,
                task_run_users.c.attempts,
                task_run_users.c.next_attempt_at,
            ).where(
                task_run_users.c.run_id == old_run,
                task_run_users.c.user_id.in_(user_ids[start : start + CHUNK]),
            )
            carried = [
                {
                    "b_run": new_run,
                    "b_user": row.user_id,
                    "attempts": row.attempts,
                    "next_attempt_at": row.next_attempt_at,
                }
                for row in await conn.execute(query)
                if row.attempts or row.next_attempt_at is not None
            ]
            if carried:
                await conn.execute(_UPDATE_USER, carried)

    async def create_in(
        self,
        conn: AsyncConnection,
        task: TaskDefinition,
        trigger: TriggerType,
        user_ids: Sequence[str],
        now: datetime,
        *,
        slot_key: str | None = None,
        slot_at: datetime | None = None,
        status: RunStatus = RunStatus.PENDING,
        skipped: Mapping[str, str] | None = None,
        dry_run: bool = False,
        continues: str | None = None,
        retry_of: str | None = None,
        run_id: str | None = None,
    ) -> str | None:
        """`create`, inside the caller's transaction (to make it atomic with other writes).
        `continues`: a run whose unfinished users this one takes over (a rerun): each keeps its
        attempts so far and its next attempt's time. `retry_of`: the run whose failed users
        this one runs again. `run_id`: the new run's id, when the caller's writes need it
        first."""
        run_id = run_id or str(uuid.uuid4())
        result = await conn.execute(
            insert_ignore(self._engine, task_runs).values(
                id=run_id,
                task_name=task.name,
                trigger_type=trigger.value,
                slot_key=slot_key,
                slot_at=slot_at,
                status=status.value,
                task_snapshot=task.for_trigger(trigger).model_dump_json(exclude={"user_ids"}),
                cancel_requested=False,
                user_total=len(user_ids),
                created_at=now,
                completed_at=now if status in FINISHED_RUN else None,
                input_tokens=0,
                output_tokens=0,
                total_tokens=0,
                dry_run=dry_run,
                retry_of=retry_of,
            )
        )
        if result.rowcount != 1:
            return None
        jitter = task.trigger.start_jitter_seconds

        def row(position: int, user_id: str) -> tuple[object, ...]:
            # a cron run with jitter: each user starts at the slot plus its own delay
            delay = jitter_offset(task.name, slot_at, user_id, jitter) if slot_at else 0.0
            due = slot_at + timedelta(seconds=delay) if slot_at is not None and delay else None
            return (run_id, user_id, position, *_NEW_USER_VALUES, delay, due)

        # in chunks: a 100k-user run never holds 100k row dicts at once
        for start in range(0, len(user_ids), CHUNK):
            chunk = user_ids[start : start + CHUNK]
            rows = [row(start + i, u) for i, u in enumerate(chunk)]
            await insert_rows(conn, task_run_users, _NEW_USER_COLUMNS, rows)
        if continues is not None:
            await self._carry_attempts(conn, continues, run_id, user_ids)
        if skipped:
            _check_transition(UserStatus.PENDING, UserStatus.SKIPPED)
            await conn.execute(
                _UPDATE_USER,
                [
                    {
                        "b_run": run_id,
                        "b_user": user_id,
                        "status": UserStatus.SKIPPED.value,
                        "completed_at": now,
                        "error": reason,
                    }
                    for user_id, reason in skipped.items()
                ],
            )
        return run_id

    async def snapshot(self, run_id: str) -> TaskDefinition:
        """The task definition the run was created with (users excluded)."""
        query = select(task_runs.c.task_snapshot).where(task_runs.c.id == run_id)
        async with self._reads.connect() as conn:
            raw = (await conn.execute(query)).scalar()
        if raw is None:
            raise NotFound(f"run '{run_id}' not found")
        return TaskDefinition.from_stored(json.loads(raw), [])

    async def mark_started(self, run_id: str, owner: str, now: datetime) -> bool:
        """pending -> running, owned by `owner`. False if the run was not pending."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(task_runs)
                .where(task_runs.c.id == run_id, task_runs.c.status == RunStatus.PENDING.value)
                .values(
                    status=RunStatus.RUNNING.value, owner=owner, started_at=now, heartbeat_at=now
                )
            )
        return result.rowcount == 1

    async def heartbeat(self, run_id: str, now: datetime) -> bool:
        """Refresh the run's lease; returns whether a cancel was requested."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(task_runs).where(task_runs.c.id == run_id).values(heartbeat_at=now)
            )
            flag = (
                await conn.execute(
                    select(task_runs.c.cancel_requested).where(task_runs.c.id == run_id)
                )
            ).scalar()
        return bool(flag)

    async def get_cancel_flag(self, run_id: str) -> bool:
        query = select(task_runs.c.cancel_requested).where(task_runs.c.id == run_id)
        async with self._reads.connect() as conn:
            return bool((await conn.execute(query)).scalar())

    async def due_users(self, run_id: str, now: datetime, limit: int) -> list[str]:
        """Up to `limit` of the run's users waiting to start whose time has come (a first
        attempt, or a retry now due), in list order, whatever their position."""
        query = (
            select(task_run_users.c.user_id)
            .where(
                task_run_users.c.run_id == run_id,
                task_run_users.c.status.in_(_WAITING),
                or_(
                    task_run_users.c.next_attempt_at.is_(None),
                    task_run_users.c.next_attempt_at <= now,
                ),
            )
            .order_by(task_run_users.c.position)
            .limit(limit)
        )
        async with self._reads.connect() as conn:
            return list((await conn.execute(query)).scalars().all())

    async def waiting(self, run_id: str, now: datetime) -> tuple[int, datetime | None]:
        """How many of the run's users may still start (pending, or retrying), and the
        earliest time after `now` one of them is due (None: none is due later)."""
        query = select(
            func.count(),
            func.min(
                case((task_run_users.c.next_attempt_at > now, task_run_users.c.next_attempt_at))
            ),
        ).where(task_run_users.c.run_id == run_id, task_run_users.c.status.in_(_WAITING))
        async with self._reads.connect() as conn:
            count, earliest = (await conn.execute(query)).one()
        return int(count), None if earliest is None else utc(earliest)

    async def start_user(
        self, run_id: str, task_name: str, user_id: str, now: datetime, *, retry: bool = False
    ) -> UserStart:
        """Mark a pending user running and take the (task, user) lock, in one transaction.

        A unit executes at most once: a user no longer pending (cancelled or interrupted while
        queued, or delivered twice by a queue) is left as it is. A user whose lock another run
        holds is marked `skipped`; the lock's primary key makes two holders impossible.

        `retry`: an earlier call with the same `now` lost its connection, so whether it
        committed is unknown. A user found running since exactly `now` with the lock held by
        this run is that call's claim: started (otherwise nobody would ever run the user, and
        its lock would be held for good).
        """
        unit = {"b_run": run_id, "b_user": user_id, "b_task": task_name, "b_now": now}
        async with self._engine.begin() as conn:
            if (await conn.execute(_CLAIM_USER, unit)).rowcount != 1:
                if retry and await self._claimed_at(conn, unit):
                    return await _started(conn, unit)
                return UserStart(started=False)
            lock = {"task_name": task_name, "user_id": user_id, "run_id": run_id}
            taken = await conn.execute(self._take_lock, {**lock, "acquired_at": now})
            if taken.rowcount == 1:
                return await _started(conn, unit)
            holder = (await conn.execute(_LOCK_HOLDER, unit)).scalar()
            error = f"already running for this task in run {holder}"
            await conn.execute(_SKIP_USER, {**unit, "b_error": error})
            return UserStart(started=False, held_by=str(holder))

    @staticmethod
    async def _claimed_at(conn: AsyncConnection, unit: dict[str, Any]) -> bool:
        """Whether the unit's user is running since `b_now`, its lock held by its run."""
        row = (
            await conn.execute(
                select(task_run_users.c.status, task_run_users.c.started_at).where(_THIS_USER),
                unit,
            )
        ).first()
        holder = (await conn.execute(_LOCK_HOLDER, unit)).scalar()
        return (
            row is not None
            and row.status == UserStatus.RUNNING.value
            and row.started_at == unit["b_now"]
            and holder == unit["b_run"]
        )

    async def end_unit(
        self,
        run_id: str,
        task_name: str,
        user_id: str,
        end: UnitEnd,
        now: datetime,
        *,
        policy: RetryPolicy | None = None,
        running_only: bool = True,
    ) -> UserStatus | None:
        """The one place a (run, user) unit's attempt ends: its next state is decided
        (`next_state`: a final status, or `retrying` at a due time under the task's retry
        `policy`, read from the run's snapshot when not given), recorded with what the attempt
        did, and the (task, user) lock released, atomically.

        Only a `running` user is ended unless not `running_only` (a user lost before it
        started: pending or retrying too); a user no longer so (recovery interrupted it, a
        duplicate delivery) is left as it is, and None returned. Otherwise the status it
        went to. An attempt followed by a retry is kept in `unit_attempts`; the user's row
        holds the latest attempt, with the tokens of all of them."""
        async with self._engine.begin() as conn:
            return await self._end_in(
                conn, run_id, task_name, user_id, end, now, policy, running_only
            )

    async def _end_in(
        self,
        conn: AsyncConnection,
        run_id: str,
        task_name: str,
        user_id: str,
        end: UnitEnd,
        now: datetime,
        policy: RetryPolicy | None,
        running_only: bool,
    ) -> UserStatus | None:
        """`end_unit` in the caller's transaction."""
        unit = {"b_run": run_id, "b_user": user_id, "b_task": task_name}
        row = (await conn.execute(_READ_USER, unit)).first()
        if row is None:
            return None
        source = UserStatus(row.status)
        if source is not UserStatus.RUNNING and (running_only or source not in WAITING_USER):
            return None
        figures = dict(end.figures)
        proposals_made = int(figures.get("proposals_created", 0))
        decided = NextState(unit_status(end.reason, proposals=proposals_made))
        if source is UserStatus.RUNNING:
            decided = next_state(
                end.reason,
                proposals=proposals_made,
                attempts=row.attempts,
                policy=policy or await self._policy(conn, run_id),
                now=now,
                draw=retry_draw(run_id, user_id, row.attempts),
                retry_after=end.retry_after,
            )
        _check_transition(source, decided.status)
        for column in _SUMMED:
            figures[column] = int(getattr(row, column)) + int(figures.get(column, 0))
        if row.cost_usd is not None or figures.get("cost_usd") is not None:
            figures["cost_usd"] = (row.cost_usd or 0.0) + (figures.get("cost_usd") or 0.0)
        values: dict[str, Any] = {
            **figures,
            "status": decided.status.value,
            "completed_at": now,
            # a success stopped by max_turns or its timeout keeps no error: it did its work
            "error": None if decided.status is UserStatus.SUCCESS else end.error,
            "reason": end.reason.value,
            "next_attempt_at": decided.due_at,
        }
        if decided.status is UserStatus.RETRYING:
            # the attempt is kept apart: the row holds the tokens so far, no attempt's own
            values.update({c: 0 for c in _ATTEMPT_COLUMNS if c not in _SUMMED})
            values.update(transcript=None, stopped_by=None, completed_at=None)
        ended = await conn.execute(_END_USER[source], {**unit, **values})
        if ended.rowcount != 1:
            return None
        if decided.status is UserStatus.RETRYING:
            await conn.execute(
                unit_attempts.insert().values(
                    run_id=run_id,
                    user_id=user_id,
                    attempt=row.attempts,
                    started_at=row.started_at,
                    completed_at=now,
                    reason=end.reason.value,
                    error=end.error,
                    **{c: end.figures.get(c, 0) for c in _ATTEMPT_COLUMNS},
                    cost_usd=end.figures.get("cost_usd"),
                    transcript=end.figures.get("transcript"),
                )
            )
        await conn.execute(_RELEASE_LOCK, unit)
        return decided.status

    @staticmethod
    async def _policy(conn: AsyncConnection, run_id: str) -> RetryPolicy:
        query = select(task_runs.c.task_snapshot).where(task_runs.c.id == run_id)
        raw = (await conn.execute(query)).scalar()
        if raw is None:
            return RetryPolicy(max_attempts=1)
        return TaskDefinition.from_stored(json.loads(raw), []).retry

    async def attempts(self, run_id: str, user_id: str) -> list[Attempt]:
        """The user's attempts in the run, oldest first: those retried, then the latest (the
        user's result, or the attempt running) unless a retry is what it waits for."""
        user = await self.user(run_id, user_id)
        query = (
            select(unit_attempts)
            .where(unit_attempts.c.run_id == run_id, unit_attempts.c.user_id == user_id)
            .order_by(unit_attempts.c.attempt)
        )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        found = [
            Attempt(**{k: v for k, v in r.items() if k not in ("run_id", "user_id")}) for r in rows
        ]
        retried = sum(a.total_tokens for a in found)
        if user.status not in WAITING_USER and user.attempts > len(found):
            found.append(
                Attempt(
                    attempt=user.attempts,
                    started_at=user.started_at,
                    completed_at=user.completed_at,
                    reason=user.reason,
                    error=user.error,
                    turns_used=user.turns_used,
                    tool_calls=user.tool_calls,
                    proposals_created=user.proposals_created,
                    # the row sums every attempt's tokens
                    input_tokens=user.input_tokens - sum(a.input_tokens for a in found),
                    output_tokens=user.output_tokens - sum(a.output_tokens for a in found),
                    total_tokens=user.total_tokens - retried,
                    cost_usd=user.cost_usd,
                    transcript=user.transcript,
                )
            )
        return found

    async def end_waiting_users(self, run_id: str, now: datetime, status: UserStatus) -> int:
        """The run's users not started yet, or waiting for a retry, end in `status`
        (cancelled, interrupted, budget exceeded): returns how many. Their next attempt's
        time stays, for a rerun to keep."""
        async with self._engine.begin() as conn:
            return await self._end_waiting_in(conn, run_id, now, status)

    @staticmethod
    async def _end_waiting_in(
        conn: AsyncConnection, run_id: str, now: datetime, status: UserStatus
    ) -> int:
        """`end_waiting_users` in the caller's transaction: the units that are not running
        end in bulk (the ones running end one by one, in `_end_in`)."""
        for source in WAITING_USER:
            _check_transition(source, status)
        result = await conn.execute(
            update(task_run_users)
            .where(task_run_users.c.run_id == run_id, task_run_users.c.status.in_(_WAITING))
            .values(status=status.value, completed_at=now, reason=REASON_OF_STATUS[status].value)
        )
        return result.rowcount

    async def tokens_used(self, run_id: str) -> int:
        """Tokens the run's users have spent so far (those recorded: finished users)."""
        query = select(func.coalesce(func.sum(task_run_users.c.total_tokens), 0)).where(
            task_run_users.c.run_id == run_id
        )
        async with self._reads.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def counts(self, run_id: str) -> dict[str, int]:
        """Users of the run per status."""
        return (await self._counts([run_id]))[run_id]

    async def _counts(self, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        query = (
            select(task_run_users.c.run_id, task_run_users.c.status, func.count())
            .where(task_run_users.c.run_id.in_(run_ids))
            .group_by(task_run_users.c.run_id, task_run_users.c.status)
        )
        counts: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
        async with self._reads.connect() as conn:
            for run_id, status, n in (await conn.execute(query)).all():
                counts[run_id][status] = int(n)
        return counts

    async def finish(self, run_id: str, now: datetime, error: str | None = None) -> TaskRun:
        """Set the final run status from its users' statuses (`final_run_status`) and sum
        their tokens. Only a run still `running` is finished (recovery may have interrupted
        it meanwhile)."""
        run = await self.get(run_id)
        status = final_run_status(run.counts, cancel_requested=run.cancel_requested, error=error)
        tokens = select(
            func.coalesce(func.sum(task_run_users.c.input_tokens), 0),
            func.coalesce(func.sum(task_run_users.c.output_tokens), 0),
            func.coalesce(func.sum(task_run_users.c.total_tokens), 0),
            func.sum(task_run_users.c.cost_usd),  # NULL when no user's cost is known
        ).where(task_run_users.c.run_id == run_id)
        async with self._engine.begin() as conn:
            input_tokens, output_tokens, total_tokens, cost = (await conn.execute(tokens)).one()
            totals = {
                "input_tokens": int(input_tokens),
                "output_tokens": int(output_tokens),
                "total_tokens": int(total_tokens),
                "cost_usd": None if cost is None else float(cost),
            }
            finished = await conn.execute(
                update(task_runs)
                .where(task_runs.c.id == run_id, task_runs.c.status == RunStatus.RUNNING.value)
                .values(
                    status=status.value, completed_at=now, heartbeat_at=now, error=error, **totals
                )
            )
            if finished.rowcount == 1:
                await self._run_finished_events(conn, run, status, totals, error, now)
        self._outbox.added()
        return await self.get(run_id)

    async def _run_finished_events(
        self,
        conn: AsyncConnection,
        run: TaskRun,
        status: RunStatus,
        totals: dict[str, Any],
        error: str | None,
        now: datetime,
    ) -> None:
        """`run.finished`, and `proposals.pending` if the run left proposals for review."""
        if not self._outbox.enabled:
            return
        by_reason = (
            select(task_run_users.c.reason, func.count())
            .where(task_run_users.c.run_id == run.id, task_run_users.c.reason.is_not(None))
            .group_by(task_run_users.c.reason)
        )
        reasons = {str(reason): int(n) for reason, n in await conn.execute(by_reason)}
        finished = {
            "run_id": run.id,
            "task": run.task_name,
            "trigger": run.trigger_type.value,
            "status": status.value,
            "dry_run": run.dry_run,
            "rerun_of": run.rerun_of,
            "retry_of": run.retry_of,
            "counts": run.counts,
            "reasons": reasons,
            "tokens": totals,
            "error": error,
            "started_at": run.started_at,
            "completed_at": now,
        }
        await self._outbox.add(conn, RUN_FINISHED, finished, now)
        waiting = select(func.count()).where(
            proposals.c.run_id == run.id, proposals.c.status == "pending"
        )
        pending = int((await conn.execute(waiting)).scalar() or 0)
        if pending:
            review = {
                "run_id": run.id,
                "task": run.task_name,
                "pending": pending,
                "console_url": self._outbox.console_link(run.id),
            }
            await self._outbox.add(conn, PROPOSALS_PENDING, review, now)

    async def request_cancel(self, run_id: str) -> TaskRun:
        run = await self.get(run_id)
        if run.status in FINISHED_RUN:
            raise Conflict(f"run '{run_id}' already finished ({run.status.value})")
        async with self._engine.begin() as conn:
            await conn.execute(
                update(task_runs).where(task_runs.c.id == run_id).values(cancel_requested=True)
            )
        return await self.get(run_id)

    async def get(self, run_id: str) -> TaskRun:
        async with self._reads.connect() as conn:
            row = (
                (await conn.execute(select(task_runs).where(task_runs.c.id == run_id)))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"run '{run_id}' not found")
        return _run(row, await self.counts(run_id))

    async def list(
        self,
        task_name: str,
        *,
        status: RunStatus | None = None,
        limit: int = 50,
        created_since: datetime | None = None,
    ) -> list[TaskRun]:
        query = select(task_runs).where(task_runs.c.task_name == task_name)
        if created_since is not None:
            query = query.where(task_runs.c.created_at >= created_since)
        if status is not None:
            query = query.where(task_runs.c.status == status.value)
        query = query.order_by(task_runs.c.created_at.desc(), task_runs.c.id).limit(limit)
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        counts = await self._counts([r["id"] for r in rows])
        return [_run(r, counts[r["id"]]) for r in rows]

    async def users(
        self, run_id: str, *, offset: int = 0, limit: int = 100, status: UserStatus | None = None
    ) -> list[UserResult]:
        query = select(task_run_users).where(task_run_users.c.run_id == run_id)
        if status is not None:
            query = query.where(task_run_users.c.status == status.value)
        query = query.order_by(task_run_users.c.position).offset(offset).limit(limit)
        async with self._reads.connect() as conn:
            return [_user(r) for r in (await conn.execute(query)).mappings().all()]

    async def of_user(self, user_id: str, limit: int = 20) -> list[tuple[str, UserResult]]:
        """(task, the user's result) in the user's most recent runs, newest first (an index
        on (user, started) from migration 0005)."""
        query = (
            select(task_run_users, task_runs.c.task_name)
            .select_from(task_run_users.join(task_runs, task_runs.c.id == task_run_users.c.run_id))
            .where(task_run_users.c.user_id == user_id)
            .order_by(task_run_users.c.started_at.desc())
            .limit(limit)
        )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        results: list[tuple[str, UserResult]] = []
        for row in rows:
            values = dict(row)
            task_name = values.pop("task_name")
            results.append((task_name, _user(values)))
        return results

    async def rerun_depth(self, run_id: str, at_most: int) -> int:
        """How many reruns deep `run_id` is (0: an original run), counted up to `at_most`."""
        depth = 0
        current = run_id
        async with self._reads.connect() as conn:
            while depth < at_most:
                key = (
                    await conn.execute(
                        select(task_runs.c.slot_key).where(task_runs.c.id == current)
                    )
                ).scalar()
                if not isinstance(key, str) or not key.startswith(RERUN_PREFIX):
                    break
                depth += 1
                current = key.removeprefix(RERUN_PREFIX)
        return depth

    async def last_started(self, task_name: str, user_id: str, other_than: str) -> datetime | None:
        """When the task last started running for the user, in a run other than
        `other_than` and not a dry run (None: never)."""
        query = (
            select(func.max(task_run_users.c.started_at))
            .select_from(task_run_users.join(task_runs, task_runs.c.id == task_run_users.c.run_id))
            .where(
                task_run_users.c.user_id == user_id,
                task_run_users.c.started_at.is_not(None),
                task_runs.c.task_name == task_name,
                task_runs.c.id != other_than,
                task_runs.c.dry_run.is_(False),
            )
        )
        async with self._reads.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def is_dry_run(self, run_id: str) -> bool:
        async with self._reads.connect() as conn:
            return await _dry_run(conn, run_id)

    async def user_ids(self, run_id: str, status: UserStatus) -> list[str]:
        """The ids of the run's users in `status`, in the run's order."""
        query = (
            select(task_run_users.c.user_id)
            .where(task_run_users.c.run_id == run_id, task_run_users.c.status == status.value)
            .order_by(task_run_users.c.position)
        )
        async with self._reads.connect() as conn:
            return list((await conn.execute(query)).scalars().all())

    async def users_named(self, run_id: str, user_ids: Sequence[str]) -> list[UserResult]:
        """Those of `user_ids` that are users of the run (any order)."""
        found: list[UserResult] = []
        for start in range(0, len(user_ids), CHUNK):
            query = select(task_run_users).where(
                task_run_users.c.run_id == run_id,
                task_run_users.c.user_id.in_(user_ids[start : start + CHUNK]),
            )
            async with self._reads.connect() as conn:
                found.extend(_user(r) for r in (await conn.execute(query)).mappings().all())
        return found

    async def user(self, run_id: str, user_id: str) -> UserResult:
        query = select(task_run_users).where(
            and_(task_run_users.c.run_id == run_id, task_run_users.c.user_id == user_id)
        )
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise NotFound(f"user '{user_id}' is not part of run '{run_id}'")
        return _user(row)

    # --- slots, leases and recovery ----------------------------------------------------

    async def last_cron_slot(self, task_name: str) -> datetime | None:
        """The newest slot recorded for the task (run or missed), if any."""
        query = (
            select(task_runs.c.slot_at)
            .where(
                task_runs.c.task_name == task_name,
                task_runs.c.trigger_type == TriggerType.CRON.value,
                task_runs.c.slot_at.is_not(None),
            )
            .order_by(task_runs.c.slot_at.desc())
            .limit(1)
        )
        async with self._reads.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def last_cron_slots(self, task_name: str, user_ids: Sequence[str]) -> dict[str, datetime]:
        """For each of the users the task ever started for in a cron run: that run's slot,
        the newest."""
        found: dict[str, datetime] = {}
        for start in range(0, len(user_ids), CHUNK):
            query = (
                select(task_run_users.c.user_id, func.max(task_runs.c.slot_at))
                .select_from(
                    task_run_users.join(task_runs, task_runs.c.id == task_run_users.c.run_id)
                )
                .where(
                    task_run_users.c.user_id.in_(user_ids[start : start + CHUNK]),
                    task_run_users.c.started_at.is_not(None),
                    task_runs.c.task_name == task_name,
                    task_runs.c.trigger_type == TriggerType.CRON.value,
                )
                .group_by(task_run_users.c.user_id)
            )
            async with self._reads.connect() as conn:
                found.update(dict((await conn.execute(query)).all()))
        return found

    async def lease_start(self, active: Sequence[str]) -> datetime | None:
        """The earliest moment from which recovery may have work one lease later: the oldest
        creation time of a pending run or the oldest heartbeat of a running one, among the
        runs not in `active` (those the caller runs or is about to start). None if none."""
        others = task_runs.c.id.not_in(list(active))
        pending = select(func.min(task_runs.c.created_at)).where(
            task_runs.c.status == RunStatus.PENDING.value, others
        )
        running = select(func.min(task_runs.c.heartbeat_at)).where(
            task_runs.c.status == RunStatus.RUNNING.value, others
        )
        async with self._reads.connect() as conn:
            times = [(await conn.execute(q)).scalar() for q in (pending, running)]
        return min((t for t in times if t is not None), default=None)

    async def orphaned_runs(self, created_before: datetime) -> list[str]:
        """Runs still pending that were created at or before `created_before`: their creator
        died between creating and starting them (or queued them as a rerun when it stopped)."""
        query = select(task_runs.c.id).where(
            task_runs.c.status == RunStatus.PENDING.value, task_runs.c.created_at <= created_before
        )
        async with self._reads.connect() as conn:
            return [row.id for row in (await conn.execute(query)).all()]

    async def running_users_of_stopped_runs(
        self, stopped_since: datetime
    ) -> list[tuple[str, str, str]]:
        """(run id, task name, user id) of users still `running` in runs `interrupted` since
        `stopped_since`: in worker mode, units a stopped server left to their workers."""
        query = (
            select(task_run_users.c.run_id, task_runs.c.task_name, task_run_users.c.user_id)
            .select_from(task_runs.join(task_run_users, task_run_users.c.run_id == task_runs.c.id))
            .where(
                task_runs.c.status == RunStatus.INTERRUPTED.value,
                task_runs.c.completed_at >= stopped_since,
                task_run_users.c.status == UserStatus.RUNNING.value,
            )
        )
        async with self._reads.connect() as conn:
            return [(r.run_id, r.task_name, r.user_id) for r in await conn.execute(query)]

    async def stale_runs(self, heartbeat_before: datetime) -> list[str]:
        """Running runs whose last heartbeat is at or before `heartbeat_before`."""
        query = select(task_runs.c.id).where(
            task_runs.c.status == RunStatus.RUNNING.value,
            task_runs.c.heartbeat_at <= heartbeat_before,
        )
        async with self._reads.connect() as conn:
            return [row.id for row in (await conn.execute(query)).all()]

    async def interrupt_stale_run(
        self, run_id: str, heartbeat_before: datetime, now: datetime, dead: Sequence[str]
    ) -> list[str] | None:
        """Mark a run whose heartbeat is at or before `heartbeat_before` as interrupted, with its
        pending users and those of its running users listed in `dead` (read before: a user
        that started since, or that a live worker runs, stays running and keeps its lock).
        Releases the interrupted users' locks. Returns those users, in list order, or None if
        another caller interrupted the run first (or it heart-beat again meanwhile)."""
        async with self._engine.begin() as conn:
            claimed = await conn.execute(
                update(task_runs)
                .where(
                    task_runs.c.id == run_id,
                    task_runs.c.status == RunStatus.RUNNING.value,
                    task_runs.c.heartbeat_at <= heartbeat_before,
                )
                .values(
                    status=RunStatus.INTERRUPTED.value,
                    completed_at=now,
                    error="owner stopped (no heartbeat within the lease)",
                )
            )
            if claimed.rowcount != 1:
                return None
            unfinished = and_(
                task_run_users.c.run_id == run_id,
                or_(
                    task_run_users.c.status.in_(_WAITING),
                    and_(
                        task_run_users.c.status == UserStatus.RUNNING.value,
                        task_run_users.c.user_id.in_(list(dead)),
                    ),
                ),
            )
            query = (
                select(task_run_users.c.user_id)
                .where(unfinished)
                .order_by(task_run_users.c.position)
            )
            users = [r.user_id for r in await conn.execute(query)]
            await self._end_waiting_in(conn, run_id, now, UserStatus.INTERRUPTED)
            task_name = (
                await conn.execute(select(task_runs.c.task_name).where(task_runs.c.id == run_id))
            ).scalar_one()
            lost = UnitEnd(
                EndReason.INTERRUPTED, "its server stopped (no heartbeat within the lease)"
            )
            for user_id in dead:
                # interrupted, not retried here: the run has ended; its rerun goes on
                await self._end_in(
                    conn, run_id, task_name, user_id, lost, now, NO_RETRIES, running_only=True
                )
        return users
