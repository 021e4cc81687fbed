"""Idle triggers: a run per idle episode of each user (`idle_minutes` after their last
message; with `max_wait_minutes`, also when an episode has lasted that long). An episode is
claimed by a conditional write to its `idle_state` row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from ralph.background.models import IdleTrigger, StoredTask
from ralph.background.schedule_store import ScheduleStore
from ralph.background.triggers.base import Fired, NextFire, Upcoming

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class IdlePass:
    """What one pass over an idle task found: due users (with the message that ends their
    episode), users the cooldown holds (with when to look again), the new watermark; and
    for a max wait, episodes that now count from another time, and episodes to forget."""

    due: dict[str, datetime]
    held: list[tuple[str, datetime]]
    watermark: datetime
    restarted: list[tuple[str, datetime]] = field(default_factory=list[tuple[str, datetime]])
    ended: list[str] = field(default_factory=list[str])


def _trigger(stored: StoredTask) -> IdleTrigger:
    trigger = stored.definition.trigger
    assert isinstance(trigger, IdleTrigger)
    return trigger


class IdleKind:
    def __init__(self, *, store: ScheduleStore, idle_interval: timedelta) -> None:
        self._store = store
        self._idle_interval = idle_interval
        # the shortest idle time of the enabled idle tasks (None: there are none)
        self.min_idle: timedelta | None = None
        # with a max-wait idle task: each user's first activity heard of since the last pass
        # (an episode that starts then is recorded from it, not from the last message the
        # next pass sees, up to an idle check later)
        self._max_wait = False
        self._first_activity: dict[str, datetime] = {}
        self._heard: dict[str, datetime] = {}

    def begin_pass(self, tasks: Sequence[StoredTask]) -> None:
        triggers = [t.definition.trigger for t in tasks]
        triggers = [t for t in triggers if isinstance(t, IdleTrigger)]
        self.min_idle = min((timedelta(minutes=t.idle_minutes) for t in triggers), default=None)
        self._max_wait = any(t.max_wait_minutes is not None for t in triggers)
        self._heard, self._first_activity = self._first_activity, {}

    def note_activity(self, user_id: str, at: datetime) -> datetime | None:
        """A user was active `at` (recorded through this process): with a max-wait task, keep
        the time for the next pass (it may start an episode). Returns when an episode of the
        user can be due (None: no idle task)."""
        if self._max_wait:
            first = self._first_activity.get(user_id)
            if first is None or at < first:
                self._first_activity[user_id] = at
        return None if self.min_idle is None else at + self.min_idle

    async def due_users(
        self,
        task_name: str,
        trigger: IdleTrigger,
        now: datetime,
        heard: Mapping[str, datetime] | None = None,
    ) -> IdlePass:
        """The task's users whose idle episode is due now, and those held back by the cooldown.

        Due: in the task's list, idle for `idle_minutes`, a message since the task last ran
        for them, and past the cooldown since that run; or, with `max_wait_minutes`, still
        active but with an episode that started that long ago (`heard`: users' first
        activity this process heard of since its last pass, which may start an episode).
        """
        idle_cutoff = now - timedelta(minutes=trigger.idle_minutes)
        cooldown = timedelta(minutes=trigger.cooldown_minutes)
        candidates, watermark = await self._store.idle_candidates(task_name, idle_cutoff, now)
        due: dict[str, datetime] = {}
        held: list[tuple[str, datetime]] = []
        for c in candidates:
            if c.last_message_at > idle_cutoff:
                continue  # active again: the window will find them when they go idle
            if c.episode_message_at is not None and c.last_message_at <= c.episode_message_at:
                continue  # this episode already ran
            if c.last_run_at is not None and c.last_run_at > now - cooldown:
                held.append((c.user_id, c.last_run_at + cooldown))
                continue
            due[c.user_id] = c.last_message_at
        new_watermark = idle_cutoff if watermark is None else max(watermark, idle_cutoff)
        found = IdlePass(due, held, new_watermark)
        if trigger.max_wait_minutes is not None:
            await self._max_waits(task_name, trigger, now, heard or {}, found)
        return found

    async def _max_waits(
        self,
        task_name: str,
        trigger: IdleTrigger,
        now: datetime,
        heard: Mapping[str, datetime],
        found: IdlePass,
    ) -> None:
        """Add to `found` the users whose episode started `max_wait_minutes` ago or more,
        idle or not (first recording the start of every episode that is not idle yet)."""
        assert trigger.max_wait_minutes is not None
        await self._store.note_episode_starts(
            task_name, now - timedelta(minutes=trigger.idle_minutes), heard
        )
        wait = timedelta(minutes=trigger.max_wait_minutes)
        cooldown = timedelta(minutes=trigger.cooldown_minutes)
        for user in await self._store.waited_too_long(task_name, now - wait):
            if not user.in_task or not user.armed or user.last_message_at is None:
                found.ended.append(user.user_id)  # fired meanwhile, or left the task
            elif user.last_run_at is not None and user.last_run_at > now - cooldown:
                # held back by the cooldown: due when it ends
                found.restarted.append((user.user_id, user.last_run_at + cooldown - wait))
            else:
                found.due.setdefault(user.user_id, user.last_message_at)

    async def fire(self, stored: StoredTask, now: datetime) -> Fired:
        task = stored.definition
        trigger = _trigger(stored)
        cooldown_cutoff = now - timedelta(minutes=trigger.cooldown_minutes)
        found = await self.due_users(task.name, trigger, now, self._heard)
        run_id, claimed = await self._store.fire_idle(
            task, list(found.due.items()), now, cooldown_cutoff
        )
        # after the run exists: a crash before this line re-reads the same window next time
        await self._store.save_idle_progress(
            task.name,
            now,
            found.held,
            found.watermark,
            restarted=found.restarted,
            ended=[*found.ended, *claimed] if trigger.max_wait_minutes is not None else [],
        )
        if run_id is not None:
            log.info("idle_fired", task=task.name, users=len(claimed), run_id=run_id)
        return Fired([run_id] if run_id else [], await self.next_check(stored, now))

    async def next_check(self, stored: StoredTask, now: datetime) -> datetime:
        """When to look at the idle task again: when its next episode can be due, and at the
        latest one idle check interval from now (activity recorded through another replica,
        which this process does not hear of)."""
        due = await self._earliest_due(stored.definition.name, _trigger(stored), now)
        fallback = now + self._idle_interval
        return max(now, fallback if due is None else min(due, fallback))

    async def upcoming(self, stored: StoredTask, now: datetime, limit: int) -> Upcoming:
        """How many users are armed now, and the earliest time one of them can be due."""
        task = stored.definition
        trigger = _trigger(stored)
        armed = await self._store.armed_users(task.name)
        due = await self._earliest_due(task.name, trigger, now)
        return Upcoming(task.name, trigger.type, task.enabled, armed_users=armed, next_due_at=due)

    async def next_fire(self, stored: StoredTask, now: datetime) -> NextFire:
        return NextFire(None)  # on the users' activity

    async def _earliest_due(
        self, name: str, trigger: IdleTrigger, now: datetime
    ) -> datetime | None:
        """The earliest time an episode of the task can be due: the oldest last message of an
        active user plus `idle_minutes`, or a deferred user's time (None: neither)."""
        idle = timedelta(minutes=trigger.idle_minutes)
        active, deferred = await self._store.next_idle_due(name, now - idle)
        due = [t for t in (active + idle if active else None, deferred) if t is not None]
        if trigger.max_wait_minutes is not None:
            started = await self._store.first_episode_start(name)
            if started is not None:
                due.append(started + timedelta(minutes=trigger.max_wait_minutes))
        return min(due, default=None)
