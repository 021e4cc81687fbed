"""Metrics of events this process observes, in prometheus_client's default registry."""

from __future__ import annotations

from prometheus_client import Histogram

SCHEDULER_LAG = Histogram(
    "ralph_scheduler_lag_seconds",
    "A cron run's creation time minus its slot time, per run this process fired",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
