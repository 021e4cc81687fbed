"""Engine creation and the few dialect differences the stores need."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Insert, Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ralph.db.dialects import ONE_STATEMENT, backend
from ralph.db.types import UTCDateTime


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine for `url` (sqlite+aiosqlite, mysql+asyncmy or postgresql+asyncpg),
    made by its backend (`ralph.db.dialects`). SQLite: the parent directory is created, one
    pooled connection serves the process (callers must not hold a connection while waiting
    for another), WAL mode and a busy timeout are set, and every transaction starts with
    BEGIN IMMEDIATE, so a read-then-write transaction never fails half-way with "database
    is locked" when another connection or process writes concurrently (reads that need not
    wait have `create_read_engine`)."""
    return backend(url).create_engine(url, pool_size)


def create_read_engine(url: str) -> AsyncEngine | None:
    """On SQLite, an engine for transactions that only read: a few connections of their own
    that begin deferred instead of IMMEDIATE, so a read never waits for the write lock that
    another process (an agent process, a worker, another server) or this process's own
    writer holds: WAL gives it a snapshot. A write through it would fail when another
    connection writes: write through `create_engine`'s. None for a server database (its
    pool serves reads as well)."""
    return backend(url).create_read_engine(url)


@asynccontextmanager
async def one_statement(engine: AsyncEngine) -> AsyncGenerator[AsyncConnection]:
    """A connection for a read of one statement. On SQLite it sends no BEGIN first (a
    statement reads a consistent snapshot by itself): one round trip to the driver's thread
    fewer. Reads of several statements that must agree take `engine.connect()`, which
    begins a transaction."""
    async with engine.connect() as conn:
        yield await conn.execution_options(**{ONE_STATEMENT: True})


def create_probe_engine(url: str) -> AsyncEngine:
    """An engine for health probes: a fresh connection per probe (no pool to queue in behind
    a long write) that gives up within about two seconds. On SQLite it only reads, which WAL
    allows while another connection or process writes."""
    return create_async_engine(
        url, poolclass=NullPool, connect_args=backend(url).probe_connect_args()
    )


async def insert_rows(
    conn: AsyncConnection, table: Table, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert `rows` (values in `columns` order, already in their database form: strings,
    numbers; a time column's values are converted here) with one executemany on the driver.

    For bulk writes of plain values: SQLAlchemy's per-row parameter handling costs about 5 us
    a row on the event loop, which made a 100,000-user task hold its connection for seconds.
    """
    sql = str(table.insert().compile(dialect=conn.dialect, column_keys=list(columns)))
    convert = {
        i: processor
        for i, name in enumerate(columns)
        if isinstance(table.c[name].type, UTCDateTime)
        and (processor := table.c[name].type.bind_processor(conn.dialect)) is not None
    }
    if convert:
        rows = [
            tuple(convert[i](v) if i in convert and v is not None else v for i, v in enumerate(row))
            for row in rows
        ]
    await conn.exec_driver_sql(sql, list(rows))


def insert_ignore(engine: AsyncEngine, table: Table) -> Insert:
    """INSERT that silently skips rows whose primary or unique key already exists."""
    return backend(engine).insert_ignore(table)


def upsert(engine: AsyncEngine, table: Table, update: Callable[[Any], dict[str, Any]]) -> Insert:
    """INSERT ... ON CONFLICT (primary key) DO UPDATE (`Backend.upsert`)."""
    return backend(engine).upsert(table, update)
