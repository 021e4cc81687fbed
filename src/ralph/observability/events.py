"""Metrics of events this process observes, in prometheus_client's default registry.

Agents may run in another process (the server's agent process, an ARQ worker): the unit's
figures (`UnitStats`) travel back to the server with the unit's answer in the `subprocess`
mode and are observed there; an ARQ worker observes them itself and serves them on
`RALPH_WORKER_METRICS_PORT`.
"""

from __future__ import annotations

from typing import TypedDict

from prometheus_client import Counter, Histogram

SCHEDULER_LAG = Histogram(
    "ralph_scheduler_lag_seconds",
    "A cron run's creation time minus its slot time, per run this process fired",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
AGENT_SECONDS = Histogram(
    "ralph_agent_run_seconds",
    "One user's agent in a background run, from start to result",
    ["task", "status"],
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
MODEL_CALL_SECONDS = Histogram(
    "ralph_model_call_seconds",
    "One HTTP request to the model provider, until its answer (each retry counts)",
    ["task"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
MODEL_CALLS = Counter("ralph_model_calls", "Requests to the model provider", ["task"])
MODEL_RATE_LIMITED = Counter(
    "ralph_model_rate_limited", "Provider answers with status 429", ["task"]
)
MODEL_RETRIES = Counter(
    "ralph_model_retries", "Requests to the provider beyond the first of a call", ["task"]
)
CHAT_TURN_SECONDS = Histogram(
    "ralph_chat_turn_seconds",
    "One chat message, from its arrival to the answer's last token (or the error)",
    ["status"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
UNITS_ENDED = Counter(
    "ralph_units_ended",
    "Attempts of users of background runs that ended here, by the status they left the user "
    "in (retrying: another attempt is due) and why (reason)",
    ["task", "status", "reason"],
)
UNIT_RETRIES = Counter(
    "ralph_unit_retries",
    "Attempts that ended in a retry (the user's next attempt is due later), by why",
    ["task", "reason"],
)
UNITS_STOPPED = Counter(
    "ralph_units_stopped",
    "Users whose agent was stopped before it finished, by what stopped it and by status (a "
    "success had made proposals first)",
    ["task", "stopped_by", "status"],
)
CHAT = "chat"  # the task label of chat's model calls


class UnitStats(TypedDict):
    """What one (run, user) unit's agent did, for the metrics above."""

    task: str
    status: str
    seconds: float
    model_call_seconds: list[float]
    rate_limited: int
    retries: int
    stopped_by: str | None
    reason: str


def observe_unit(stats: UnitStats) -> None:
    task = stats["task"]
    AGENT_SECONDS.labels(task, stats["status"]).observe(stats["seconds"])
    UNITS_ENDED.labels(task, stats["status"], stats.get("reason", "")).inc()
    if stats["status"] == "retrying":
        UNIT_RETRIES.labels(task, stats.get("reason", "")).inc()
    stopped_by = stats.get("stopped_by")
    if stopped_by:
        UNITS_STOPPED.labels(task, stopped_by, stats["status"]).inc()
    observe_model_calls(task, stats["model_call_seconds"], stats["rate_limited"], stats["retries"])


def observe_model_calls(
    task: str, call_seconds: list[float], rate_limited: int, retries: int
) -> None:
    """An agent's requests to the provider (`task`: the background task's name, or `chat`)."""
    latency = MODEL_CALL_SECONDS.labels(task)
    for seconds in call_seconds:
        latency.observe(seconds)
    MODEL_CALLS.labels(task).inc(len(call_seconds))
    MODEL_RATE_LIMITED.labels(task).inc(rate_limited)
    MODEL_RETRIES.labels(task).inc(retries)


def observe_chat(seconds: float, failed: bool) -> None:
    CHAT_TURN_SECONDS.labels("error" if failed else "success").observe(seconds)
