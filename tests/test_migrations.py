"""Migrations go from empty to head and back on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect

from ralph.db import migrate
from ralph.db.engine import create_engine
from ralph.db.tables import compared, metadata, outside_metadata
from tests.helpers import (
    create_mariadb_database,
    create_postgres_database,
    drop_mariadb_database,
    drop_postgres_database,
)


@pytest.fixture(params=["sqlite", "mariadb", "postgres"])
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    if request.param == "postgres":
        url = await create_postgres_database()
        yield url
        await drop_postgres_database(url)
        return
    url = await create_mariadb_database()
    yield url
    await drop_mariadb_database(url)


async def _table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda c: inspect(c).get_table_names())
        return {name for name in names if not outside_metadata(name)} - {"alembic_version"}
    finally:
        await engine.dispose()


async def test_upgrade_to_head_then_downgrade_to_base(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        assert await migrate.current_revision(engine) is None
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
        assert await _table_names(empty_database_url) == set(metadata.tables)

        await migrate.downgrade(engine, "base")
        assert await migrate.current_revision(engine) is None
        assert await _table_names(empty_database_url) == set()

        # and up again: a downgrade leaves nothing behind that blocks a fresh upgrade
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_tables(empty_database_url: str) -> None:
    """Tables, columns, indexes and constraints made by the migrations are the ones the code
    declares (column types aside: the custom ones are compared by their tests)."""
    engine = create_engine(empty_database_url)
    try:
        await migrate.upgrade(engine)

        def differences(connection: Connection) -> list[Any]:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": False,
                    "include_name": compared,
                },
            )
            return list(compare_metadata(context, metadata))

        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


async def test_upgrade_is_idempotent(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        await migrate.upgrade(engine)
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()
