"""The database servers Ralph's tests and benchmarks make throwaway databases on: MariaDB
(`RALPH_TEST_MARIADB_URL`, default root@127.0.0.1:3306) and PostgreSQL
(`RALPH_TEST_POSTGRES_URL`, default postgres@127.0.0.1:5432). A database per test session or
benchmark, uniquely named, dropped after."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from sqlalchemy import text

from ralph.db.engine import create_engine


class Unreachable(RuntimeError):
    """The database server does not answer."""


@dataclass(frozen=True)
class DatabaseServer:
    """A database server to make databases on."""

    name: str
    url: str  # the server's, without a database
    admin_database: str  # what to connect to to create and drop databases
    create_options: str = ""
    url_options: str = ""
    drop_options: str = ""

    async def reachable(self) -> bool:
        try:
            await self._admin("SELECT 1")
        except Exception:
            return False
        return True

    async def create_database(self, prefix: str = "ralph_test") -> str:
        """Create a uniquely named database; its URL (Unreachable if the server does not
        answer)."""
        if not await self.reachable():
            raise Unreachable(f"{self.name} not reachable at {self.url}")
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        await self._admin(f"CREATE DATABASE {name}{self.create_options}")
        return f"{self.url}/{name}{self.url_options}"

    async def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?")[0]
        await self._admin(f"DROP DATABASE IF EXISTS {name}{self.drop_options}")

    async def _admin(self, statement: str) -> None:
        engine = create_engine(f"{self.url}/{self.admin_database}")
        try:
            async with engine.connect() as connection:
                # PostgreSQL creates and drops databases outside a transaction
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                await connection.execute(text(statement))
        finally:
            await engine.dispose()


MARIADB = DatabaseServer(
    "MariaDB",
    os.environ.get("RALPH_TEST_MARIADB_URL", "mysql+asyncmy://root@127.0.0.1:3306"),
    "",
    create_options=" CHARACTER SET utf8mb4",
    url_options="?charset=utf8mb4",
)
POSTGRES = DatabaseServer(
    "PostgreSQL",
    os.environ.get("RALPH_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432"),
    "postgres",
    drop_options=" WITH (FORCE)",
)
SERVERS = {"mariadb": MARIADB, "postgres": POSTGRES}
