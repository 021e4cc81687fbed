"""Retrying a transaction that lost a race on a unique key or a lock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import IntegrityError, OperationalError

T = TypeVar("T")

# MySQL/MariaDB: 1213 deadlock, 1205 lock wait timeout. SQLite: "database is locked".
_RETRYABLE_CODES = {1213, 1205}


def _is_retryable(error: Exception) -> bool:
    if isinstance(error, IntegrityError):
        return True
    if isinstance(error, OperationalError):
        orig = getattr(error, "orig", None)
        args = getattr(orig, "args", ())
        if args and args[0] in _RETRYABLE_CODES:
            return True
        return "database is locked" in str(error)
    return False


async def retrying(operation: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Run `operation` (one whole transaction) again when it lost a race, up to `attempts`.

    Only duplicate-key, deadlock and lock-timeout failures are retried; the operation must be
    safe to repeat from the start, which a rolled-back transaction is.
    """
    for attempt in range(attempts):
        try:
            return await operation()
        except (IntegrityError, OperationalError) as error:
            if attempt == attempts - 1 or not _is_retryable(error):
                raise
    raise AssertionError("unreachable")
