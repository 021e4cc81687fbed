"""A task's quality at a glance: per day, the users it ran for by status, the proposals its
agents made by outcome and how many reviewers approved, the tokens and cost; and per block.
Read with three grouped queries (days in UTC); dry runs and previews are not counted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.authors import Author
from ralph.db.tables import proposals, task_run_users, task_runs
from ralph.memory.models import ProposalStatus

# a proposal's outcome: its status, with approvals split by whether the reviewer edited them
OUTCOMES = (
    "approved",
    "approved_with_edits",
    "rejected",
    "superseded",
    "expired",
    "conflict",
    "pending",
)


def approval_rate(outcomes: Mapping[str, int]) -> float | None:
    """Approved (edited or not) over decided by a reviewer (approved or rejected); None when
    nothing was."""
    approved = outcomes.get("approved", 0) + outcomes.get("approved_with_edits", 0)
    decided = approved + outcomes.get("rejected", 0)
    return round(approved / decided, 4) if decided else None


def _zero() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


@dataclass(slots=True)
class DayStats:
    day: date
    users: dict[str, int] = field(default_factory=dict[str, int])
    proposals: dict[str, int] = field(default_factory=_zero)
    approval_rate: float | None = None
    total_tokens: int = 0
    cost_usd: float | None = None


@dataclass(slots=True)
class LabelStats:
    label: str
    proposals: dict[str, int] = field(default_factory=_zero)
    approval_rate: float | None = None


@dataclass(slots=True)
class TaskStats:
    task: str
    days: int
    since: datetime
    proposals: dict[str, int]
    approval_rate: float | None
    total_tokens: int
    cost_usd: float | None
    per_day: list[DayStats]
    per_label: list[LabelStats]


def _day(value: object) -> date:
    """A SQL DATE() as the driver returns it (SQLite: text, MySQL: a date)."""
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def _add_cost(total: float | None, cost: object) -> float | None:
    return total if cost is None else (total or 0.0) + float(str(cost))


class StatsStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def task_stats(self, task: str, days: int, now: datetime, since: datetime) -> TaskStats:
        """The task's last `days` days up to `now` (from `since` if later: the task's own
        creation), oldest first, every day listed."""
        first = max(
            since,
            (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0),
        )
        by_day = {
            first.date() + timedelta(days=n): DayStats(first.date() + timedelta(days=n))
            for n in range((now.date() - first.date()).days + 1)
        }
        run_day = func.date(task_runs.c.created_at)
        of_task = (
            task_runs.c.task_name == task,
            task_runs.c.dry_run.is_(False),
            task_runs.c.created_at >= first,
        )
        users = (
            select(run_day, task_run_users.c.status, func.count())
            .select_from(task_run_users.join(task_runs, task_runs.c.id == task_run_users.c.run_id))
            .where(*of_task)
            .group_by(run_day, task_run_users.c.status)
        )
        tokens = (
            select(run_day, func.sum(task_runs.c.total_tokens), func.sum(task_runs.c.cost_usd))
            .where(*of_task)
            .group_by(run_day)
        )
        made_day = func.date(proposals.c.created_at)
        made = (
            select(
                made_day, proposals.c.label, proposals.c.status, proposals.c.edited, func.count()
            )
            .where(
                proposals.c.author == str(Author.of_task(task)),
                proposals.c.created_at >= first,
                proposals.c.status != ProposalStatus.PREVIEW.value,
            )
            .group_by(made_day, proposals.c.label, proposals.c.status, proposals.c.edited)
        )
        labels: dict[str, LabelStats] = {}
        totals = _zero()
        total_tokens = 0
        total_cost: float | None = None
        async with self._engine.connect() as conn:
            for day, status, n in (await conn.execute(users)).all():
                stats = by_day.get(_day(day))
                if stats is not None:
                    stats.users[str(status)] = stats.users.get(str(status), 0) + int(n)
            for day, spent, cost in (await conn.execute(tokens)).all():
                stats = by_day.get(_day(day))
                if stats is not None:
                    stats.total_tokens = int(spent or 0)
                    stats.cost_usd = _add_cost(None, cost)
                    total_tokens += stats.total_tokens
                    total_cost = _add_cost(total_cost, cost)
            for day, label, status, edited, n in (await conn.execute(made)).all():
                outcome = str(status)
                if outcome == ProposalStatus.APPROVED.value and edited:
                    outcome = "approved_with_edits"
                stats = by_day.get(_day(day))
                if stats is None:
                    continue
                stats.proposals[outcome] = stats.proposals.get(outcome, 0) + int(n)
                per_label = labels.setdefault(str(label), LabelStats(str(label)))
                per_label.proposals[outcome] = per_label.proposals.get(outcome, 0) + int(n)
                totals[outcome] = totals.get(outcome, 0) + int(n)
        for stats in by_day.values():
            stats.approval_rate = approval_rate(stats.proposals)
        for per_label in labels.values():
            per_label.approval_rate = approval_rate(per_label.proposals)
        return TaskStats(
            task=task,
            days=days,
            since=first,
            proposals=totals,
            approval_rate=approval_rate(totals),
            total_tokens=total_tokens,
            cost_usd=total_cost,
            per_day=list(by_day.values()),
            per_label=sorted(labels.values(), key=lambda s: s.label),
        )
