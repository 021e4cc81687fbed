"""Why a (run, user) unit ended: one typed value for each way a unit can end, recorded with its
result (`reason`), instead of text to match. Retries (next) decide on these."""

from __future__ import annotations

from enum import StrEnum


class EndReason(StrEnum):
    FINISHED = "finished"  # the agent finished (or extract returned its edits)
    RATE_LIMITED = "rate_limited"  # the provider kept answering 429 (or asked to wait long)
    TIMEOUT = "timeout"  # the task's timeout_seconds ran out
    PROVIDER_ERROR = "provider_error"  # the provider failed (5xx, refused, unreachable)
    INVALID_REPLY = "invalid_reply"  # a reply that could not be used (malformed, an unmade call)
    BUDGET_EXCEEDED = "budget_exceeded"  # the task's token budget stopped it
    MAX_TURNS = "max_turns"  # the task's max_turns stopped it
    REPEATING = "repeating"  # the loop guard stopped it: it kept repeating its tool calls
    CANCELLED = "cancelled"  # a cancel of the run, or its task deleted
    WORKER_LOST = "worker_lost"  # the process running it went away (agent process, worker)
    INTERRUPTED = "interrupted"  # a shutdown or a crash of its server (re-run)
    INTERNAL = "internal"  # a tool or Ralph itself failed
