"""Cron triggers: a run per slot of the schedule, read in the task's timezone or in each
user's; a slot is claimed by the unique (task, slot key) of its run row."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog

from ralph.background.cron import never_fires_reason
from ralph.background.models import (
    CronTrigger,
    RunStatus,
    StoredTask,
    TaskDefinition,
    TriggerType,
)
from ralph.background.run_store import RunStore
from ralph.background.slots import (
    DueSlot,
    due_instants,
    next_instant,
    ran_this_local_day,
    upcoming_instants,
)
from ralph.background.triggers.base import Fire, Fired, NextFire, Upcoming
from ralph.observability.events import SCHEDULER_LAG
from ralph.users.store import ProfileStore

log = structlog.get_logger(__name__)


def _trigger(stored: StoredTask) -> CronTrigger:
    trigger = stored.definition.trigger
    assert isinstance(trigger, CronTrigger)
    return trigger


class CronKind:
    def __init__(self, *, runs: RunStore, profiles: ProfileStore) -> None:
        self._runs = runs
        self._profiles = profiles

    def begin_pass(self, tasks: Sequence[StoredTask]) -> None:
        pass

    async def zone_counts(self, task: TaskDefinition) -> dict[str, int]:
        """The timezones the task's schedule is read in (its own, or its users'), each with
        how many of the task's users it fires for."""
        trigger = task.trigger
        assert isinstance(trigger, CronTrigger)
        if not trigger.per_user:
            return {trigger.timezone: len(task.user_ids)}
        return await self._profiles.zone_counts(task.name, trigger.fallback_timezone)

    async def fire(self, stored: StoredTask, now: datetime) -> Fired:
        trigger = _trigger(stored)
        zones = sorted(await self.zone_counts(stored.definition))
        run_ids = await self._fire(stored, trigger, zones, now)
        upcoming = next_instant(trigger.schedule, zones, now)
        # a cron expression stored before expressions were checked: nothing to retry until
        # the task is replaced, which wakes the loop
        error = None if upcoming else "the cron expression has no fire time ahead"
        return Fired(run_ids, upcoming, error)

    async def _fire(
        self, stored: StoredTask, trigger: CronTrigger, zones: list[str], now: datetime
    ) -> list[str]:
        task = stored.definition
        after = stored.schedule_from
        last = await self._runs.last_cron_slot(task.name)
        if last is not None and last > after:
            after = last
        grace = timedelta(seconds=task.misfire_grace_seconds)
        started: list[str] = []
        # oldest first: a crash between two leaves the later ones due on the next tick
        for due in due_instants(trigger.schedule, zones, after, now, grace):
            users, skipped = await self._slot_users(task, trigger, due)
            status = RunStatus.PENDING if due.zones else RunStatus.MISSED
            run_id = await self._runs.create(
                task,
                TriggerType.CRON,
                users,
                now,
                slot_key=f"cron:{due.at.isoformat()}",
                slot_at=due.at,
                status=status,
                skipped=skipped,
            )
            if run_id is None:
                continue  # another replica claimed this slot
            if status is RunStatus.PENDING:
                started.append(run_id)
                SCHEDULER_LAG.observe((now - due.at).total_seconds())
                log.info("cron_fired", task=task.name, slot=due.at.isoformat(), run_id=run_id)
            else:
                log.warning("cron_missed", task=task.name, slot=due.at.isoformat())
        return started

    async def _slot_users(
        self, task: TaskDefinition, trigger: CronTrigger, due: DueSlot
    ) -> tuple[list[str], dict[str, str]]:
        """The users a due slot runs (those of its zones), and those of them skipped with
        the reason: users who moved timezone after running on the slot's local day."""
        if not due.zones:
            return [], {}
        if not trigger.per_user:
            return task.user_ids, {}
        fallback = trigger.fallback_timezone
        users = await self._profiles.users_in_zones(task.name, due.zones, fallback)
        # only a move in the last two days can put an earlier slot on the same local day
        recent = due.at - timedelta(days=2)
        moved = {u: (zone, at) for u, zone, at in users if at is not None and at > recent}
        skipped: dict[str, str] = {}
        if moved:
            last = await self._runs.last_cron_slots(task.name, list(moved))
            for user_id, (zone, moved_at) in moved.items():
                if ran_this_local_day(trigger.schedule, last.get(user_id), moved_at, due.at, zone):
                    skipped[user_id] = (
                        f"already ran on this local day ({zone}) before the timezone changed"
                    )
        return [u for u, _, _ in users], skipped

    async def upcoming(self, stored: StoredTask, now: datetime, limit: int) -> Upcoming:
        """The next `limit` fire times (from the schedule's start if later than now)."""
        task = stored.definition
        trigger = _trigger(stored)
        after = max(now, stored.schedule_from)
        zones = await self.zone_counts(task)
        fires = [
            Fire(at, zone, zones[zone])
            for at, zone in upcoming_instants(trigger.schedule, sorted(zones), after, limit)
        ]
        return Upcoming(task.name, trigger.type, task.enabled, fires)

    async def next_fire(self, stored: StoredTask, now: datetime) -> NextFire:
        trigger = _trigger(stored)
        after = max(now, stored.schedule_from)
        zones = await self.zone_counts(stored.definition)
        at = next_instant(trigger.schedule, zones, after)
        return NextFire(at, None if at else never_fires_reason(trigger.schedule, now))
