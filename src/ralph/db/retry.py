"""Retrying a transaction that lost a race on a unique key or a lock, or that found the
database gone for a while."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from ralph.db.dialects import is_lost_in_query, is_race, is_refusal

log = structlog.get_logger(__name__)

T = TypeVar("T")


def _is_retryable(error: DBAPIError) -> bool:
    return isinstance(error, IntegrityError) or is_race(error)


async def retrying(operation: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Run `operation` (one whole transaction) again when it lost a race, up to `attempts`.

    Only duplicate-key, deadlock and lock-timeout failures are retried; the operation must be
    safe to repeat from the start, which a rolled-back transaction is.
    """
    for attempt in range(attempts):
        try:
            return await operation()
        except DBAPIError as error:
            if attempt == attempts - 1 or not _is_retryable(error):
                raise
    raise AssertionError("unreachable")


UNREACHABLE = (OperationalError, InterfaceError, OSError)


# that many connections in a row, each made (the pool pings it first) and then lost during the
# statement (MariaDB's 2013, 2006: `Backend.lost_codes`), is the statement's doing, not an
# outage, which soon fails to connect at all
_LOST_IN_QUERY_LIMIT = 3


def is_unreachable(error: BaseException) -> bool:
    """Whether `error` says the database could not be reached (or answered as if gone), as
    opposed to refusing what was asked."""
    # a refusal of the statement itself (too large, invalid data): the database is there
    if isinstance(error, IntegrityError) or is_refusal(error):
        return False
    # SQLAlchemy's dialect recognised a dropped connection (asyncpg's "connection was closed
    # in the middle of operation" arrives as a plain DBAPIError)
    invalidated = isinstance(error, DBAPIError) and error.connection_invalidated
    return invalidated or isinstance(error, UNREACHABLE)


async def until_reachable(
    operation: Callable[[], Awaitable[T]], *, what: str, give_up_after: float = 600.0
) -> T:
    """Run `operation` (one whole transaction, safe to repeat) until the database answers:
    a lost or refused connection is retried with back-off (0.2 s doubling to 5 s) for up to
    `give_up_after` seconds, then raised. For the writes that must not be lost to an outage
    (a user's result, a run's end). Other errors are raised at once, and so is a statement
    that can never succeed (refused as too large or invalid, or losing its connection three
    times in a row, each time on a connection that was made)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    delay = 0.2
    lost_in_query = 0
    while True:
        try:
            return await operation()
        except (DBAPIError, OSError) as error:
            # MariaDB drops the connection of a statement past max_allowed_packet: the
            # connection was made each time, the statement killed it; an outage soon fails
            # to connect instead
            lost_in_query = lost_in_query + 1 if is_lost_in_query(error) else 0
            if (
                loop.time() + delay > deadline
                or not is_unreachable(error)
                or lost_in_query >= _LOST_IN_QUERY_LIMIT
            ):
                raise
            log.warning("database_unreachable", what=what, error=str(error)[:200], retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
