"""SQL storage for user profiles (the only writer of `user_profiles`), and the reads that
group a task's users by timezone for cron in each user's local time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, case, func, literal, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.db.engine import upsert
from ralph.db.tables import task_users, user_profiles
from ralph.db.types import UTCDateTime
from ralph.users.models import UserProfile


def _profile(row: Row[Any]) -> UserProfile:
    return UserProfile(
        user_id=row.user_id,
        timezone=row.timezone,
        metadata=json.loads(row.metadata),
        timezone_changed_at=row.timezone_changed_at,
        updated_at=row.updated_at,
    )


# a task's users (filtered on `task_users.task_name`), each with their profile if any
_USERS_WITH_PROFILES = task_users.outerjoin(
    user_profiles, user_profiles.c.user_id == task_users.c.user_id
)


class ProfileStore:
    def __init__(self, engine: AsyncEngine, reads: AsyncEngine | None = None) -> None:
        self._engine = engine
        # transactions that only read (SQLite: see ralph.db.engine.create_read_engine)
        self._reads = reads or engine

    def _upsert(self, now: datetime) -> Any:
        """Insert or replace a profile; the change time moves only when the timezone does
        (in one statement: two writers racing on one new profile cannot both insert)."""
        return upsert(
            self._engine,
            user_profiles,
            lambda proposed: {
                "timezone_changed_at": case(
                    (
                        user_profiles.c.timezone.is_not_distinct_from(proposed.timezone),
                        user_profiles.c.timezone_changed_at,
                    ),
                    else_=literal(now, UTCDateTime()),
                ),
                "timezone": proposed.timezone,
                "metadata": proposed.metadata,
                "updated_at": proposed.updated_at,
            },
        )

    async def get(self, user_id: str) -> UserProfile | None:
        query = select(user_profiles).where(user_profiles.c.user_id == user_id)
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _profile(row)

    async def put(
        self, user_id: str, timezone: str | None, metadata: dict[str, Any], now: datetime
    ) -> UserProfile:
        async with self._engine.begin() as conn:
            await conn.execute(
                self._upsert(now).values(
                    user_id=user_id,
                    timezone=timezone,
                    metadata=json.dumps(metadata, separators=(",", ":")),
                    # a first profile without a timezone is no move
                    timezone_changed_at=None if timezone is None else now,
                    updated_at=now,
                )
            )
            row = (
                await conn.execute(select(user_profiles).where(user_profiles.c.user_id == user_id))
            ).one()
        return _profile(row)

    # --- a task's users by timezone -------------------------------------------------------

    async def zone_counts(self, task_name: str, fallback: str) -> dict[str, int]:
        """How many of the task's users live in each timezone (`fallback` for those whose
        profile names none)."""
        zone = func.coalesce(user_profiles.c.timezone, fallback)
        query = (
            select(zone, func.count())
            .select_from(_USERS_WITH_PROFILES)
            .where(task_users.c.task_name == task_name)
            .group_by(zone)
        )
        async with self._reads.connect() as conn:
            return dict((await conn.execute(query)).all())

    async def users_in_zones(
        self, task_name: str, zones: Sequence[str], fallback: str
    ) -> list[tuple[str, str, datetime | None]]:
        """The task's users living in `zones`, in the task's order, each with their timezone
        and the time it last changed."""
        zone = func.coalesce(user_profiles.c.timezone, fallback)
        query = (
            select(task_users.c.user_id, zone, user_profiles.c.timezone_changed_at)
            .select_from(_USERS_WITH_PROFILES)
            .where(task_users.c.task_name == task_name, zone.in_(list(zones)))
            .order_by(task_users.c.position)
        )
        async with self._reads.connect() as conn:
            return [(u, z, at) for u, z, at in (await conn.execute(query)).all()]
