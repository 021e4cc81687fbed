"""The order in which a run's pending users start, and when each may start."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

from ralph.background.models import CronTrigger, TaskDefinition
from ralph.background.run_store import RunStore
from ralph.db.retry import until_reachable


async def start_order(
    runs: RunStore, run_id: str, task: TaskDefinition, stopping: Callable[[], bool]
) -> AsyncIterator[tuple[str, datetime | None]]:
    """The run's pending users in the order they start, each with the time it may start
    (None: at once). A cron run with `jitter_seconds` starts each user at its slot plus the
    user's delay, soonest first (read at once, to order them); other runs page through the
    list in its order, until `stopping()`."""
    trigger = task.trigger
    if isinstance(trigger, CronTrigger) and trigger.jitter_seconds:
        run = await until_reachable(lambda: runs.get(run_id), what="run")
        if run.slot_at is not None:
            slot = run.slot_at
            delays = await until_reachable(
                lambda: runs.pending_by_start(run_id), what="pending users"
            )
            for delay, user_id in delays:
                yield user_id, slot + timedelta(seconds=delay)
            return
    page = max(task.batch_size * 2, 100)
    after = -1
    while not stopping():
        batch = await until_reachable(
            functools.partial(runs.pending_users, run_id, after, page), what="pending users"
        )
        if not batch:
            return
        for position, user_id in batch:
            yield user_id, None
            after = position
