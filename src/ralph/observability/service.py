"""`/metrics` in the Prometheus text format: the database's figures, read at scrape time (the
same on every replica, whichever process ran the agents), then this process's own events."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ralph.clock import Clock
from ralph.memory.models import ProposalStatus
from ralph.observability.store import MetricsStore

# users by status are counted over the runs created this long ago at most (a full count
# would read every user row of every run at each scrape)
RECENT = timedelta(hours=24)


class _Snapshot(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


class MetricsService:
    def __init__(self, store: MetricsStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def families(self) -> list[Metric]:
        now = self._clock.now()
        runs = GaugeMetricFamily("ralph_runs", "Runs by task and status", labels=["task", "status"])
        for task, status, n in await self._store.runs():
            runs.add_metric([task, status], n)
        users = GaugeMetricFamily(
            "ralph_run_users_recent",
            "Users by task and status in the runs created in the last 24 hours",
            labels=["task", "status"],
        )
        for task, status, n in await self._store.recent_users(now - RECENT):
            users.add_metric([task, status], n)
        tokens = CounterMetricFamily(
            "ralph_tokens", "Model tokens of finished runs by task", labels=["task", "kind"]
        )
        for task, given, taken in await self._store.tokens():
            tokens.add_metric([task, "input"], given)
            tokens.add_metric([task, "output"], taken)
        by_status = dict(await self._store.proposals())
        pending = GaugeMetricFamily(
            "ralph_proposals_pending", "Proposals waiting for a person's review"
        )
        pending.add_metric([], by_status.get(ProposalStatus.PENDING.value, 0))
        proposals = GaugeMetricFamily("ralph_proposals", "Proposals by status", labels=["status"])
        for status in ProposalStatus:
            proposals.add_metric([status.value], by_status.get(status.value, 0))
        ticks = GaugeMetricFamily(
            "ralph_scheduler_last_tick_age_seconds",
            "Seconds since each replica's scheduler last ticked (replicas seen in 10 minutes)",
            labels=["replica"],
        )
        for replica, last_tick in await self._store.replicas(now - timedelta(minutes=10)):
            if last_tick is not None:
                ticks.add_metric([replica], (now - last_tick).total_seconds())
        webhooks = GaugeMetricFamily(
            "ralph_webhook_events",
            "Webhook events in the outbox by status (delivered ones are kept 7 days)",
            labels=["status"],
        )
        by_state = dict(await self._store.webhook_events())
        for state in ("pending", "delivered", "failed"):
            webhooks.add_metric([state], by_state.get(state, 0))
        return [runs, users, tokens, pending, proposals, ticks, webhooks]

    async def render(self) -> bytes:
        """The database's figures, then this process's event metrics."""
        snapshot = CollectorRegistry(auto_describe=False)
        snapshot.register(_Snapshot(await self.families()))
        return generate_latest(snapshot) + generate_latest(REGISTRY)
