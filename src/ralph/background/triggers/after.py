"""`after` triggers (task chains): task B runs for a user once task A's unit has ended for
them with a status in B's `on`, `delay_seconds` later; users whose A results end close
together share one B run. Each (A's run, user) is claimed once across replicas (a row of
`task_chain_claims`); A's results are the rows of its runs, so a crash between A's result
and B's start loses nothing: the next pass finds the result unclaimed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import structlog

from ralph.background.chain_store import ChainStore, UpstreamOutcome, UpstreamResult
from ralph.background.models import MAX_CHAIN, AfterTrigger, StoredTask, TaskDefinition
from ralph.background.triggers.base import Fired, NextFire, Upcoming
from ralph.errors import Conflict, InvalidInput
from ralph.memory.models import Proposal

log = structlog.get_logger(__name__)

# results ending this close together go to one run: B's start waits this long after the
# first, and a task's `after` runs are created this far apart at least (however late results
# become visible under load)
BATCH_WINDOW = timedelta(seconds=1)
# how far a pass looks back before the time up to which it followed everything: a result
# recorded with an earlier time than another's, but committed after it, is still found
_OVERLAP = timedelta(minutes=1)
# what B's agent is told of A's outcome, at most
OUTCOME_MAX_CHARS = 4000


def _trigger(stored: StoredTask) -> AfterTrigger:
    trigger = stored.definition.trigger
    assert isinstance(trigger, AfterTrigger)
    return trigger


def check_chains(tasks: Mapping[str, TaskDefinition], changed: str | None = None) -> None:
    """InvalidInput unless every `after` trigger of `tasks` (all the tasks there will be)
    follows a task there, no chain comes back to where it started, and none holds more than
    `MAX_CHAIN` tasks. The chain of task `changed` is looked at first (errors name it)."""
    names = sorted(tasks, key=lambda n: n != changed)
    for name in names:
        seen = [name]
        trigger = tasks[name].trigger
        while isinstance(trigger, AfterTrigger):
            upstream = trigger.task
            if upstream not in tasks:
                raise InvalidInput(
                    f"task '{seen[-1]}' follows task '{upstream}', which does not exist"
                )
            if upstream in seen:
                cycle = " after ".join([*seen[seen.index(upstream) :], upstream])
                raise InvalidInput(f"tasks follow each other in a cycle: {cycle}")
            seen.append(upstream)
            if len(seen) > MAX_CHAIN:
                raise InvalidInput(
                    f"a chain of tasks holds at most {MAX_CHAIN}: {' after '.join(seen)}"
                )
            trigger = tasks[upstream].trigger


def followers(tasks: Mapping[str, TaskDefinition], name: str) -> list[str]:
    """The tasks that follow task `name`."""
    return sorted(
        t.name
        for t in tasks.values()
        if isinstance(t.trigger, AfterTrigger) and t.trigger.task == name
    )


def check_delete(tasks: Mapping[str, TaskDefinition], name: str) -> None:
    """Conflict if another task follows task `name`."""
    following = [f for f in followers(tasks, name) if f != name]
    if following:
        raise Conflict(
            f"task '{name}' is followed by {', '.join(repr(f) for f in following)}: "
            "delete those first, or change their triggers"
        )


def chain_order(tasks: Sequence[TaskDefinition]) -> list[TaskDefinition]:
    """`tasks` with every task after the one it follows (when that is among them): the order
    to write them in, so each write leaves a valid set of tasks."""
    by_name = {t.name: t for t in tasks}
    ordered: dict[str, TaskDefinition] = {}

    def visit(task: TaskDefinition, depth: int) -> None:
        if task.name in ordered or depth > len(tasks):
            return
        trigger = task.trigger
        if isinstance(trigger, AfterTrigger) and trigger.task in by_name:
            visit(by_name[trigger.task], depth + 1)
        ordered[task.name] = task

    for task in tasks:
        visit(task, 0)
    return list(ordered.values())


def outcome_context(
    outcomes: Sequence[UpstreamOutcome], made: Mapping[str, Sequence[Proposal]]
) -> str:
    """What the upstream task did for the user (`made`: the proposals of each upstream run,
    oldest first), for the following task's agent (at most `OUTCOME_MAX_CHARS`)."""
    parts: list[str] = []
    for outcome in outcomes:
        proposals = made.get(outcome.run_id, ())
        lines = [
            f"What task '{outcome.task_name}' did for this user before you "
            f"(run {outcome.run_id}, {outcome.status}):"
        ]
        if outcome.answer:
            lines.append(f"Its answer: {outcome.answer[:1500]}")
        if proposals:
            lines.append("Its proposals:")
            lines += [
                f"- {p.id} on '{p.label}' ({p.kind.value}, {p.status.value}): {p.text[:400]}"
                for p in proposals[:10]
            ]
        else:
            lines.append("It proposed nothing.")
        parts.append("\n".join(lines))
    text = "\n\n".join(parts)
    if len(text) > OUTCOME_MAX_CHARS:
        text = text[: OUTCOME_MAX_CHARS - 20].rstrip() + "\n(cut for length)"
    return text


class AfterKind:
    def __init__(self, *, chains: ChainStore, idle_interval: timedelta) -> None:
        self._chains = chains
        self._idle_interval = idle_interval
        self._enabled: set[str] = set()
        # upstream task -> the delays of the enabled tasks that follow it
        self._delays: dict[str, list[timedelta]] = {}

    def begin_pass(self, tasks: Sequence[StoredTask]) -> None:
        self._enabled = {t.definition.name for t in tasks}
        delays: dict[str, list[timedelta]] = {}
        for stored in tasks:
            trigger = stored.definition.trigger
            if isinstance(trigger, AfterTrigger):
                delays.setdefault(trigger.task, []).append(timedelta(seconds=trigger.delay_seconds))
        self._delays = delays

    def note_result(self, task_name: str, at: datetime) -> datetime | None:
        """A unit of `task_name` ended `at` (through this process): when a task following it
        is to look (None: none follows it)."""
        delays = self._delays.get(task_name)
        return None if not delays else at + min(delays) + BATCH_WINDOW

    async def fire(self, stored: StoredTask, now: datetime) -> Fired:
        task = stored.definition
        trigger = _trigger(stored)
        delay = timedelta(seconds=trigger.delay_seconds)
        fallback = now + self._idle_interval
        if trigger.task not in self._enabled:
            # the upstream task is disabled: its results (of manual runs) are not followed
            await self._chains.save_watermark(task.name, now)
            return Fired([], fallback)
        since, results = await self._pending(stored, trigger)
        due = [r for r in results if r.completed_at + delay <= now]
        left = results
        run_ids: list[str] = []
        last = await self._chains.last_fired(task.name) if due else None
        spaced = last is None or last + BATCH_WINDOW <= now
        if due and spaced and due[0].completed_at + delay + BATCH_WINDOW <= now:
            run_id, claimed = await self._chains.fire(task, due, now)
            if run_id is not None:
                run_ids.append(run_id)
                log.info("after_fired", task=task.name, follows=trigger.task, users=len(claimed))
            left = [r for r in results if r.completed_at + delay > now]
        # everything before this has been followed (or was not due): the next pass starts here
        mark = min([now - delay - _OVERLAP, *(r.completed_at for r in left)])
        if mark > since:
            await self._chains.save_watermark(task.name, mark)
        next_check = fallback
        if left:
            due_at = left[0].completed_at + delay + BATCH_WINDOW
            if not run_ids and last is not None:
                due_at = max(due_at, last + BATCH_WINDOW)
            next_check = min(fallback, max(now, due_at))
        return Fired(run_ids, next_check)

    async def _pending(
        self, stored: StoredTask, trigger: AfterTrigger
    ) -> tuple[datetime, list[UpstreamResult]]:
        """(where this pass starts: the schedule's start or the watermark, the later; the
        upstream results not followed since)."""
        name = stored.definition.name
        watermark = await self._chains.watermark(name)
        since = max(stored.schedule_from, watermark or stored.schedule_from)
        return since, await self._chains.pending(name, trigger.task, trigger.on, since)

    async def upcoming(self, stored: StoredTask, now: datetime, limit: int) -> Upcoming:
        """The users waiting for this task (an upstream result not followed yet), and when
        the first of them is due."""
        task = stored.definition
        trigger = _trigger(stored)
        _, results = await self._pending(stored, trigger)
        due = None
        if results:
            due = results[0].completed_at + timedelta(seconds=trigger.delay_seconds)
        return Upcoming(
            task.name,
            trigger.type,
            task.enabled,
            next_due_at=due,
            follows=trigger.task,
            waiting_users=len({r.user_id for r in results}),
        )

    async def next_fire(self, stored: StoredTask, now: datetime) -> NextFire:
        return NextFire(None)  # on the upstream task's results
