"""Column types that behave the same on every database Ralph runs on."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, Text
from sqlalchemy.dialects.mysql import MEDIUMTEXT
from sqlalchemy.types import TypeDecorator

from ralph.db.dialects import backend


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database (microsecond precision)."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        return dialect.type_descriptor(backend(dialect).column_type("datetime") or DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use an aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def LongText() -> Any:  # noqa: N802 - reads like a type
    """Text up to 16 MB: MySQL's TEXT stops at 64 KB, which a 64 KiB body in UTF-8 exceeds."""
    return Text().with_variant(MEDIUMTEXT(), "mysql")
