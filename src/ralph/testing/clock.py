"""A clock that only moves when told to."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta


class FakeClock:
    """A `Clock` for tests: `now()` is fixed until `advance`/`set` moves it.

    `sleep_until` waits until the fake time reaches the target, so code that sleeps on the
    clock wakes exactly when a test moves time past its deadline.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._changed = asyncio.Condition()
        self.sleepers = 0

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        async with self._changed:
            self.sleepers += 1
            try:
                await self._changed.wait_for(lambda: self._now >= when)
            finally:
                self.sleepers -= 1

    async def set(self, when: datetime) -> None:
        """Move to `when` (never backwards) and wake sleepers whose time has come."""
        if when < self._now:
            raise ValueError("a FakeClock does not go backwards")
        async with self._changed:
            self._now = when
            self._changed.notify_all()

    async def advance(self, delta: timedelta | float) -> None:
        """Move forward by `delta` (a timedelta or seconds)."""
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        await self.set(self._now + delta)
