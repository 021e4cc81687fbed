"""Cron slots in a timezone, DST-safe: a skipped local time fires at the next valid time, a
repeated local time fires once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter


def slots_after(schedule: str, timezone: str, after: datetime) -> Iterator[datetime]:
    """UTC instants of the schedule strictly after `after`, in order, forever."""
    zone = ZoneInfo(timezone)
    iterator = croniter(schedule, after.astimezone(zone))
    last_wall: datetime | None = None
    while True:
        slot: datetime = iterator.get_next(datetime)
        wall = slot.replace(tzinfo=None)
        # In a repeated hour (DST fall-back) croniter yields the same wall time twice, at two
        # different instants: the wall clock must move forward for a slot to count.
        if last_wall is not None and wall <= last_wall:
            continue
        last_wall = wall
        yield slot.astimezone(UTC)


def due_slots(
    schedule: str, timezone: str, after: datetime, now: datetime, limit: int = 1000
) -> list[datetime]:
    """Slots in (after, now], oldest first; at most the newest `limit` of them."""
    found: list[datetime] = []
    for slot in slots_after(schedule, timezone, after):
        if slot > now:
            break
        found.append(slot)
        if len(found) > limit:
            found.pop(0)
    return found


def next_slot(schedule: str, timezone: str, after: datetime) -> datetime:
    return next(slots_after(schedule, timezone, after))
