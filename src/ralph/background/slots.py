"""Which cron slots are due, for a schedule read in one timezone or in each user's own.

A per-user schedule ("timezone": "user") is the same expression read in every timezone the
task's users live in; users whose slots fall on the same instant share one run. Each timezone
coalesces on its own: its newest due slot runs if it is inside the grace window, every other
due slot of it is missed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import repeat
from zoneinfo import ZoneInfo

from ralph.background.cron import due_slots, next_slot, slots_after


@dataclass(slots=True)
class DueSlot:
    """One due instant: the timezones whose users run at it (none: a missed slot)."""

    at: datetime
    zones: list[str] = field(default_factory=list[str])


def due_instants(
    schedule: str, zones: Iterable[str], after: datetime, now: datetime, grace: timedelta
) -> list[DueSlot]:
    """The instants in (after, now] at which the schedule is due in any of `zones`, oldest
    first, each with the zones that run at it."""
    plan: dict[datetime, DueSlot] = {}
    for zone in zones:
        slots = due_slots(schedule, zone, after, now)
        for slot in slots:
            plan.setdefault(slot, DueSlot(slot))
        if slots and now - slots[-1] <= grace:
            plan[slots[-1]].zones.append(zone)
    return [plan[at] for at in sorted(plan)]


def next_instant(schedule: str, zones: Iterable[str], after: datetime) -> datetime | None:
    """The first instant after `after` at which the schedule fires in any of `zones`."""
    found = [s for s in (next_slot(schedule, zone, after) for zone in zones) if s is not None]
    return min(found, default=None)


def upcoming_instants(
    schedule: str, zones: Sequence[str], after: datetime, limit: int
) -> list[tuple[datetime, str]]:
    """The schedule's first `limit` distinct instants after `after` in any of `zones`, as
    (instant, zone) pairs in time order (several zones may share an instant)."""
    merged = heapq.merge(*[zip(slots_after(schedule, z, after), repeat(z)) for z in zones])
    found: list[tuple[datetime, str]] = []
    instants = 0
    for at, zone in merged:
        if not found or found[-1][0] != at:
            instants += 1
            if instants > limit:
                break
        found.append((at, zone))
    return found


def ran_this_local_day(
    schedule: str,
    last_slot: datetime | None,
    moved_at: datetime | None,
    slot: datetime,
    zone: str,
) -> bool:
    """Whether a user who changed timezone already ran for `slot`'s local day in their new
    `zone`: their last slot, taken in the old timezone before the move, is on the same date
    there and after the new zone's previous slot. The rule that keeps a move from running
    someone twice in one local day; a user who has not moved since their last slot, or whose
    last slot is one of the new zone's own (several slots a day), is never held back."""
    if last_slot is None or moved_at is None or moved_at <= last_slot:
        return False
    tz = ZoneInfo(zone)
    if last_slot.astimezone(tz).date() != slot.astimezone(tz).date():
        return False
    # no slot of the new zone lies in [last_slot, slot): the user's run covers this one
    return next_slot(schedule, zone, last_slot - timedelta(seconds=1)) == slot
