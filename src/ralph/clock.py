"""Time as a dependency: everything that reads the time takes a Clock."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Source of the current time and of waiting."""

    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Return at `when` or later (immediately if it has passed). Cancellable."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        delay = (when - self.now()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)


async def sleep_until_or(clock: Clock, when: datetime, event: asyncio.Event) -> None:
    """Sleep on `clock` until `when`, or until `event` is set, whichever comes first."""
    sleeper = asyncio.create_task(clock.sleep_until(when))
    waker = asyncio.create_task(event.wait())
    try:
        await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (sleeper, waker):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending


def utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime; naive values are taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
