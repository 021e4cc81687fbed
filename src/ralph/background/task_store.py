"""SQL storage for task definitions and their user lists."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.background.models import StoredTask, TaskDefinition, schedule_restarts
from ralph.db.engine import insert_rows
from ralph.db.tables import background_tasks, task_users
from ralph.errors import Conflict, NotFound

CHUNK = 1000


class TaskStore:
    """Task definitions. The database is the source of truth; `revision` grows on every change
    so caches in other replicas can tell when to reload."""

    def __init__(self, engine: AsyncEngine, reads: AsyncEngine | None = None) -> None:
        self._engine = engine
        # transactions that only read (SQLite: see ralph.db.engine.create_read_engine)
        self._reads = reads or engine

    async def _users(self, conn: AsyncConnection, name: str) -> list[str]:
        query = (
            select(task_users.c.user_id)
            .where(task_users.c.task_name == name)
            .order_by(task_users.c.position)
        )
        return list((await conn.execute(query)).scalars().all())

    async def _write_users(self, conn: AsyncConnection, name: str, user_ids: list[str]) -> None:
        await conn.execute(delete(task_users).where(task_users.c.task_name == name))
        for start in range(0, len(user_ids), CHUNK):
            chunk = user_ids[start : start + CHUNK]
            await insert_rows(
                conn,
                task_users,
                ("task_name", "user_id", "position"),
                [(name, u, start + i) for i, u in enumerate(chunk)],
            )

    @staticmethod
    def _row_values(task: TaskDefinition) -> dict[str, Any]:
        return {
            "definition": task.model_dump_json(exclude={"user_ids"}),
            "trigger_type": task.trigger.type,
            "enabled": task.enabled,
            "user_count": len(task.user_ids),
        }

    async def create(self, task: TaskDefinition, now: datetime) -> StoredTask:
        """Store a new task; Conflict if the name is taken."""
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    background_tasks.insert().values(
                        name=task.name,
                        schedule_from=now,
                        revision=1,
                        created_at=now,
                        updated_at=now,
                        **self._row_values(task),
                    )
                )
                await self._write_users(conn, task.name, task.user_ids)
        except IntegrityError:
            raise Conflict(f"task '{task.name}' already exists; PUT replaces it") from None
        return StoredTask(task, now, now, now, 1)

    async def replace(self, task: TaskDefinition, now: datetime) -> StoredTask:
        """Replace a task's definition; the schedule restarts from now if
        `schedule_restarts`."""
        async with self._engine.begin() as conn:
            current = await self._get(conn, task.name, with_users=False)
            if current is None:
                raise NotFound(f"task '{task.name}' not found")
            restart = schedule_restarts(current.definition, task)
            schedule_from = now if restart else current.schedule_from
            await conn.execute(
                update(background_tasks)
                .where(background_tasks.c.name == task.name)
                .values(
                    schedule_from=schedule_from,
                    # an idle task's users or trigger may have changed: rescan once; an `after`
                    # task's results are followed from its schedule's start, not again
                    idle_watermark=(
                        background_tasks.c.idle_watermark
                        if task.trigger.type == "after" and not restart
                        else None
                    ),
                    revision=background_tasks.c.revision + 1,
                    updated_at=now,
                    **self._row_values(task),
                )
            )
            await self._write_users(conn, task.name, task.user_ids)
        return StoredTask(task, current.created_at, now, schedule_from, current.revision + 1)

    async def set_enabled(self, name: str, enabled: bool, now: datetime) -> StoredTask:
        async with self._engine.begin() as conn:
            current = await self._get(conn, name, with_users=False)
            if current is None:
                raise NotFound(f"task '{name}' not found")
            if current.definition.enabled != enabled:
                task = current.definition.model_copy(update={"enabled": enabled})
                values = self._row_values(task)
                values.pop("user_count")
                await conn.execute(
                    update(background_tasks)
                    .where(background_tasks.c.name == name)
                    .values(
                        revision=background_tasks.c.revision + 1,
                        updated_at=now,
                        schedule_from=now if enabled else current.schedule_from,
                        **values,
                    )
                )
        stored = await self.get(name)
        assert stored is not None
        return stored

    async def delete(self, name: str) -> None:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(background_tasks).where(background_tasks.c.name == name)
            )
            if result.rowcount == 0:
                raise NotFound(f"task '{name}' not found")
            await conn.execute(delete(task_users).where(task_users.c.task_name == name))

    async def get(self, name: str) -> StoredTask | None:
        async with self._reads.connect() as conn:
            return await self._get(conn, name)

    async def _get(
        self, conn: AsyncConnection, name: str, *, with_users: bool = True
    ) -> StoredTask | None:
        """The stored task; without its users (an empty list) unless `with_users`."""
        row = (
            (await conn.execute(select(background_tasks).where(background_tasks.c.name == name)))
            .mappings()
            .first()
        )
        if row is None:
            return None
        return self._stored(row, await self._users(conn, name) if with_users else [])

    @staticmethod
    def _stored(row: RowMapping, user_ids: list[str]) -> StoredTask:
        data = json.loads(row["definition"])
        data["enabled"] = bool(row["enabled"])
        definition = TaskDefinition.from_stored(data, user_ids)
        return StoredTask(
            definition, row["created_at"], row["updated_at"], row["schedule_from"], row["revision"]
        )

    async def list(self) -> list[StoredTask]:
        async with self._reads.connect() as conn:
            rows = (
                (await conn.execute(select(background_tasks).order_by(background_tasks.c.name)))
                .mappings()
                .all()
            )
            users: dict[str, list[str]] = {r["name"]: [] for r in rows}
            query = select(task_users.c.task_name, task_users.c.user_id).order_by(
                task_users.c.task_name, task_users.c.position
            )
            for task_name, user_id in (await conn.execute(query)).all():
                users.setdefault(task_name, []).append(user_id)
        return [self._stored(r, users[r["name"]]) for r in rows]

    @staticmethod
    async def watermark_in(conn: AsyncConnection, name: str) -> datetime | None:
        """The task's trigger watermark (idle: activity up to it was seen; after: upstream
        results up to it were followed), read on `conn`."""
        query = select(background_tasks.c.idle_watermark).where(background_tasks.c.name == name)
        return (await conn.execute(query)).scalar()

    @staticmethod
    async def advance_watermark_in(conn: AsyncConnection, name: str, watermark: datetime) -> None:
        """Move the task's watermark (an idle or an `after` task's) forward (never back,
        whichever replica writes last), inside the caller's transaction."""
        await conn.execute(
            update(background_tasks)
            .where(
                background_tasks.c.name == name,
                or_(
                    background_tasks.c.idle_watermark.is_(None),
                    background_tasks.c.idle_watermark < watermark,
                ),
            )
            .values(idle_watermark=watermark)
        )

    async def fingerprint(self) -> frozenset[tuple[str, int, datetime]]:
        """(name, revision, created_at) of every task: differs after any create, change or
        delete, whatever the clocks of the replicas that made them (a task deleted and created
        again under its name has a new creation time)."""
        query = select(
            background_tasks.c.name, background_tasks.c.revision, background_tasks.c.created_at
        )
        async with self._reads.connect() as conn:
            return frozenset(
                (name, int(revision), created_at)
                for name, revision, created_at in (await conn.execute(query)).all()
            )
