"""The one place that knows the databases Ralph runs on: SQLite, MySQL/MariaDB (and Dolt),
PostgreSQL. Each is a small `Backend` the stores and the engine ask (insert-or-ignore,
upsert, `GREATEST`, row locks, connection options, which errors are races, refusals or lost
connections), in the spirit of APScheduler's per-store capabilities: adding a database is
adding a backend here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Column, ColumnElement, Insert, Table, func, literal_column, or_, select
from sqlalchemy import table as table_clause
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.mysql import match as mysql_match
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

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

    def engine_options(self, pool_size: int) -> dict[str, Any]:
        return {
            "pool_size": pool_size,
            "max_overflow": pool_size,
            "pool_pre_ping": True,
            "pool_recycle": 1800,
            "isolation_level": "READ COMMITTED",
        }

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
    _insert = staticmethod(sqlite_insert)

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

    def text_match(self, column: Column[Any], words: Sequence[str]) -> ColumnElement[bool]:
        # a GIN index on to_tsvector('english', column): the expression must be the index's
        document = func.to_tsvector(literal_column("'english'"), column)
        queries = [func.plainto_tsquery(literal_column("'english'"), word) for word in words]
        return or_(*(document.op("@@")(query) for query in queries))


BACKENDS: dict[str, Backend] = {b.name: b for b in (SQLite(), MySQL(), PostgreSQL())}


def backend(engine: AsyncEngine | str) -> Backend:
    """The backend of an engine, or of a database URL."""
    name = make_url(engine).get_backend_name() if isinstance(engine, str) else engine.dialect.name
    return BACKENDS[name]


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
