"""The one place that knows the databases Ralph runs on: SQLite, MySQL/MariaDB (and Dolt),
PostgreSQL. Each is a small `Backend` the stores, the engine, the column types and the
migrations ask (engines and connection options, insert-or-ignore, upsert, `GREATEST`, row
locks, full-text search, batch migrations, which errors are races, refusals or lost
connections), in the spirit of APScheduler's per-store capabilities: adding a database is
adding a backend here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Dialect,
    Insert,
    Table,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy import table as table_clause
from sqlalchemy.dialects.mysql import DATETIME as MYSQL_DATETIME
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.mysql import match as mysql_match
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.types import TypeEngine

# The URL schemes Ralph accepts, with their async drivers.
URL_SCHEMES = ("sqlite+aiosqlite://", "mysql+asyncmy://", "postgresql+asyncpg://")

Update = Callable[[Any], dict[str, Any]]


def _error_code(error: BaseException) -> object:
    """The driver's error code: MySQL's number (its first argument), PostgreSQL's SQLSTATE."""
    orig = getattr(error, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate:
        return str(sqlstate)
    args = getattr(orig, "args", ())
    return args[0] if args else None


# a connection's execution option: it runs one statement, which needs no BEGIN on SQLite
ONE_STATEMENT = "ralph_one_statement"


def _sqlite_engine(url: str, connections: int, begin: str) -> AsyncEngine:
    """A pool of `connections` to a SQLite file in WAL mode, whose transactions start with
    `begin` (a one-statement read: none)."""
    engine = create_async_engine(
        url, connect_args={"timeout": 30}, pool_size=connections, max_overflow=0, pool_timeout=300
    )
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so "begin" below decides how to start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        if not connection.get_execution_options().get(ONE_STATEMENT):
            connection.exec_driver_sql(begin)

    return engine


class Backend:
    """What differs between databases, as the stores ask it."""

    name = "base"
    # statements that take row locks (SELECT ... FOR UPDATE) rather than a database lock
    lock_rows = True
    # errors of a transaction that lost a race (a deadlock, a lock wait, a serialization
    # failure): the transaction may be run again
    race_codes: frozenset[object] = frozenset()
    # errors of a statement that can never succeed (too large, invalid data)
    refusal_codes: frozenset[object] = frozenset()
    # errors of a connection that was made and then dropped during the statement
    lost_codes: frozenset[object] = frozenset()

    def insert_ignore(self, table: Table) -> Insert:
        """INSERT that silently skips rows whose primary or unique key already exists."""
        raise NotImplementedError

    def upsert(self, table: Table, update: Update) -> Insert:
        """INSERT ... ON CONFLICT (primary key) DO UPDATE. `update(proposed)` returns column
        -> SQL expression, in the order to assign them; `proposed` names the row being
        inserted. An expression that reads the old row comes before the assignments of the
        columns it reads (MySQL reads the row as assigned so far)."""
        raise NotImplementedError

    def greatest(self, *values: Any) -> ColumnElement[Any]:
        return func.greatest(*values)

    # whether ALTER TABLE is emulated by copying the table (alembic's batch mode)
    batch_migrations = False
    # how a Dolt procedure is called (a Dolt server's procedures; doltlite's functions)
    dolt_verb = "CALL"

    def column_type(self, name: str) -> TypeEngine[Any] | None:
        """This database's type for Ralph's column type `name` ("datetime"), if its own."""
        return None

    def create_engine(self, url: str, pool_size: int) -> AsyncEngine:
        return create_async_engine(url, **self.engine_options(pool_size))

    def create_read_engine(self, url: str) -> AsyncEngine | None:
        """An engine of its own for transactions that only read, if the database needs one
        (None: the engine's pool serves reads as well)."""
        return None

    def engine_options(self, pool_size: int) -> dict[str, Any]:
        return {
            "pool_size": pool_size,
            "max_overflow": pool_size,
            "pool_pre_ping": True,
            "pool_recycle": 1800,
            "isolation_level": "READ COMMITTED",
        }

    # whether `text_match` must be a query of its own (a UNION with the substring match) for
    # the planner to use its index: ORed with a LIKE, PostgreSQL computes to_tsvector for
    # each of the user's rows (measured: 170-400 ms for a user of 20,000 messages, 20-60 ms
    # apart); SQLite and MySQL are faster with the two ORed in one query
    text_match_apart = False

    def text_match(self, column: Column[Any], words: Sequence[str]) -> ColumnElement[bool]:
        """Rows whose `column` holds any of `words` (lowercase \\w+ words, with their stems)
        by the database's full-text index (made by migration 0017): stemmed where the
        database stems ("cats" finds "cat"), else as word prefixes. `column`'s table has that
        index."""
        raise NotImplementedError

    # the driver's connect argument that bounds connecting, in seconds
    timeout_arg = "connect_timeout"

    def probe_connect_args(self) -> dict[str, Any]:
        """Connection options of a health probe: give up within about two seconds."""
        return {self.timeout_arg: 2}


class _OnConflict(Backend):
    """A database with INSERT ... ON CONFLICT (SQLite, PostgreSQL): the old row is read
    throughout an upsert's assignments."""

    @staticmethod
    def _insert(table: Table) -> Any:
        raise NotImplementedError

    def insert_ignore(self, table: Table) -> Insert:
        return self._insert(table).on_conflict_do_nothing()

    def upsert(self, table: Table, update: Update) -> Insert:
        stmt = self._insert(table)
        return stmt.on_conflict_do_update(
            index_elements=list(table.primary_key.columns), set_=update(stmt.excluded)
        )


class SQLite(_OnConflict):
    name = "sqlite"
    lock_rows = False  # BEGIN IMMEDIATE takes the database's one write lock
    timeout_arg = "timeout"
    batch_migrations = True
    dolt_verb = "SELECT"
    _insert = staticmethod(sqlite_insert)

    def create_engine(self, url: str, pool_size: int) -> AsyncEngine:
        database = make_url(url).database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # One connection per process: SQLite has a single writer anyway, and queueing in the
        # pool is far cheaper than SQLite's busy-wait back-off between connections of one
        # process. Other processes on the same file still coordinate through the file lock.
        return _sqlite_engine(url, 1, "BEGIN IMMEDIATE")

    def create_read_engine(self, url: str) -> AsyncEngine | None:
        return _sqlite_engine(url, 4, "BEGIN")

    def greatest(self, *values: Any) -> ColumnElement[Any]:
        return func.max(*values)  # SQLite's scalar max() of several arguments

    def text_match(self, column: Column[Any], words: Sequence[str]) -> ColumnElement[bool]:
        # FTS5 table `<table>_fts` (porter stemmer), rowid = the row's integer primary key
        index = table_clause(f"{column.table.name}_fts")
        query = " OR ".join(f'"{word}"' for word in words)
        rowid: ColumnElement[int] = literal_column("rowid")
        hits = select(rowid).select_from(index).where(literal_column(index.name).op("MATCH")(query))
        [key] = column.table.primary_key.columns
        return key.in_(hits)


class MySQL(Backend):
    """MySQL, MariaDB and Dolt's server."""

    name = "mysql"
    # 1213 deadlock, 1205 lock wait timeout
    race_codes = frozenset({1213, 1205})
    # 1153 packet too large, 1406 data too long, 1366 incorrect string value, 1264 out of
    # range, 1292 incorrect value, 1048 column cannot be null
    refusal_codes = frozenset({1153, 1406, 1366, 1264, 1292, 1048})
    # 2013 the connection was lost during a query, 2006 the server has gone away (the
    # statement was sent on a connection the server had just closed)
    lost_codes = frozenset({2013, 2006})

    def column_type(self, name: str) -> TypeEngine[Any] | None:
        # DATETIME keeps whole seconds unless asked for microseconds
        return MYSQL_DATETIME(fsp=6) if name == "datetime" else None

    def insert_ignore(self, table: Table) -> Insert:
        return mysql_insert(table).prefix_with("IGNORE")

    def upsert(self, table: Table, update: Update) -> Insert:
        stmt = mysql_insert(table)
        # as (column, value) pairs: MySQL assigns them in order, each seeing the ones before
        return stmt.on_duplicate_key_update(list(update(stmt.inserted).items()))

    def text_match(self, column: Column[Any], words: Sequence[str]) -> ColumnElement[bool]:
        # a FULLTEXT index; boolean mode, each word optional and a prefix ("cat*" finds
        # "cats"); InnoDB does not index words under 3 letters (innodb_ft_min_token_size)
        return mysql_match(column, against=" ".join(f"{word}*" for word in words)).in_boolean_mode()


class PostgreSQL(_OnConflict):
    name = "postgresql"
    timeout_arg = "timeout"
    _insert = staticmethod(postgresql_insert)
    # 40001 serialization failure, 40P01 deadlock, 55P03 lock not available
    race_codes = frozenset({"40001", "40P01", "55P03"})
    # 22001 value too long, 22003 out of range, 22P02 invalid text, 22021 invalid byte
    # sequence, 23502 not null, 54000 program limit exceeded (a row too large)
    refusal_codes = frozenset({"22001", "22003", "22P02", "22021", "23502", "54000"})
    text_match_apart = True

    def text_match(self, column: Column[Any], words: Sequence[str]) -> ColumnElement[bool]:
        # a GIN index on to_tsvector('english', column): the expression must be the index's
        # one tsquery of the words ORed (`||`): one condition the planner estimates well
        document = func.to_tsvector(literal_column("'english'"), column)
        queries = [func.plainto_tsquery(literal_column("'english'"), word) for word in words]
        return document.op("@@")(functools.reduce(lambda a, b: a.op("||")(b), queries))


BACKENDS: dict[str, Backend] = {b.name: b for b in (SQLite(), MySQL(), PostgreSQL())}


def backend(engine: AsyncEngine | Dialect | str) -> Backend:
    """The backend of an engine, a SQLAlchemy dialect, or a database URL."""
    if isinstance(engine, str):
        return BACKENDS[make_url(engine).get_backend_name()]
    return BACKENDS[engine.name if isinstance(engine, Dialect) else engine.dialect.name]


def _coded(error: BaseException, codes: str) -> bool:
    """Whether `error`'s code is among some backend's `codes` (an attribute's name)."""
    code = _error_code(error)
    return any(code in getattr(b, codes) for b in BACKENDS.values())


def is_race(error: BaseException) -> bool:
    """A transaction that lost a race (deadlock, lock wait, serialization failure), on any
    backend; SQLite's "database is locked"."""
    return _coded(error, "race_codes") or "database is locked" in str(error)


def is_refusal(error: BaseException) -> bool:
    """A statement the database refuses whatever happens (too large, invalid data); SQLite's
    "too big"."""
    return _coded(error, "refusal_codes") or "too big" in str(error)


def is_lost_in_query(error: BaseException) -> bool:
    """A connection that was made and then dropped during the statement."""
    return _coded(error, "lost_codes")
