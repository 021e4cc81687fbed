"""Cron slots in a timezone, DST-safe: a skipped local time fires at the next valid time, a
repeated local time fires once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

# An expression whose next slot is further away than this is refused: it never fires
# ("0 0 31 2 *") or so rarely that it is a mistake. Feb 29 slots are at most 8 years apart.
HORIZON_YEARS = 8


def slots_after(schedule: str, timezone: str, after: datetime) -> Iterator[datetime]:
    """UTC instants of the schedule strictly after `after`, in order; ends if the expression
    has no further fire time (croniter gives up after decades without one)."""
    zone = ZoneInfo(timezone)
    iterator = croniter(schedule, after.astimezone(zone))
    last_wall: datetime | None = None
    while True:
        try:
            slot: datetime = iterator.get_next(datetime)
        except CroniterBadDateError:
            return
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


def next_slot(schedule: str, timezone: str, after: datetime) -> datetime | None:
    """The first slot after `after`, or None if the expression never fires again."""
    return next(slots_after(schedule, timezone, after), None)


def never_fires_reason(schedule: str, now: datetime) -> str | None:
    """Why a (syntactically valid) expression is unusable, or None if it fires in time."""
    upcoming = next_slot(schedule, "UTC", now)
    if upcoming is None or upcoming - now > timedelta(days=366 * HORIZON_YEARS):
        return f"cron expression {schedule!r} has no fire time in the next {HORIZON_YEARS} years"
    return None
