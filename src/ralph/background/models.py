"""Background task definitions, triggers, runs and per-user results."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal, cast

from croniter import croniter
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ralph.background.cron import never_fires_reason
from ralph.reasons import EndReason
from ralph.validation import (
    Label,
    StrictInput,
    TaskName,
    UserId,
    check_timezone,
    unique_user_ids,
)

# Validation context for definitions read back from the database: checks added since a row
# was written must not make it unreadable.
STORED = "stored"

# a cron trigger's `timezone` that reads the schedule in each user's own timezone
USER_TIMEZONE = "user"


class CronTrigger(StrictInput):
    """Fire at each slot of a cron expression, read in an IANA timezone."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["cron"] = "cron"
    schedule: str = Field(examples=["0 3 * * *"])
    timezone: str = Field(
        default="UTC",
        description=(
            'IANA timezone the schedule is read in, or "user": each user\'s own (their '
            "profile's `timezone`, else `default_timezone`); one run per distinct instant."
        ),
    )
    default_timezone: str | None = Field(
        default=None,
        description='With `"timezone": "user"`: the timezone of users without one (UTC).',
    )
    jitter_seconds: int = Field(
        default=0,
        ge=0,
        le=3600,
        description=(
            "Spread the users' starts over this many seconds after the slot: each user's "
            "delay is fixed by (task, slot, user), so 10,000 users do not start at once."
        ),
    )

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str, info: ValidationInfo) -> str:
        value = " ".join(value.split())
        if len(value.split(" ")) != 5 or not croniter.is_valid(value):
            raise ValueError(f"invalid cron expression {value!r} (5 fields: m h dom mon dow)")
        if info.context is not None and info.context.get(STORED):
            return value  # a row written before this check: the scheduler isolates it
        # the wall clock, not the injected one: whether an expression can fire at all does not
        # depend on the day it is checked
        reason = never_fires_reason(value, datetime.now(UTC))
        if reason is not None:
            raise ValueError(reason)
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        return value if value == USER_TIMEZONE else check_timezone(value)

    @field_validator("default_timezone")
    @classmethod
    def _valid_default(cls, value: str | None) -> str | None:
        return None if value is None else check_timezone(value)

    @model_validator(mode="after")
    def _default_only_for_users(self) -> CronTrigger:
        if self.default_timezone is not None and self.timezone != USER_TIMEZONE:
            raise ValueError(
                f"default_timezone applies to timezone {USER_TIMEZONE!r} only "
                f"(this trigger's schedule is read in {self.timezone!r})"
            )
        return self

    @property
    def per_user(self) -> bool:
        """The schedule is read in each user's own timezone."""
        return self.timezone == USER_TIMEZONE

    @property
    def fallback_timezone(self) -> str:
        """The timezone of a user without one in their profile (per-user schedules)."""
        return self.default_timezone or "UTC"

    @property
    def start_jitter_seconds(self) -> int:
        """The spread of a run's users' starts after its slot."""
        return self.jitter_seconds

    @property
    def summary(self) -> str:
        """One line for lists (the console's, the command line's)."""
        jitter = f", jitter {self.jitter_seconds}s" if self.jitter_seconds else ""
        return f"cron {self.schedule} ({self.timezone}){jitter}"


class IdleTrigger(StrictInput):
    """Fire once per idle episode: `idle_minutes` after a user's last message."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["idle"] = "idle"
    idle_minutes: int = Field(ge=1, le=60 * 24 * 365)
    cooldown_minutes: int = Field(default=60, ge=0, le=60 * 24 * 365)
    max_wait_minutes: int | None = Field(
        default=None,
        ge=1,
        le=60 * 24 * 365,
        description=(
            "Fire an episode of a user who never goes idle this long after it started (its "
            "first activity Ralph saw), as Inngest's debounce timeout. At least idle_minutes."
        ),
    )

    @model_validator(mode="after")
    def _wait_covers_idle(self) -> IdleTrigger:
        if self.max_wait_minutes is not None and self.max_wait_minutes < self.idle_minutes:
            raise ValueError(
                f"max_wait_minutes ({self.max_wait_minutes}) must be at least idle_minutes "
                f"({self.idle_minutes})"
            )
        return self

    @property
    def start_jitter_seconds(self) -> int:
        return 0

    @property
    def summary(self) -> str:
        wait = f", max wait {self.max_wait_minutes}m" if self.max_wait_minutes else ""
        return f"idle {self.idle_minutes}m, cooldown {self.cooldown_minutes}m{wait}"


# the user statuses a unit ends in (an `after` trigger's `on` names some of them)
EndStatus = Literal["success", "failed", "skipped", "cancelled", "interrupted", "budget_exceeded"]

# how many tasks a chain of `after` triggers holds at most (A, then B after A, ...)
MAX_CHAIN = 5


class AfterTrigger(StrictInput):
    """Run for a user once another task's unit has ended for them: per user, not per run."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["after"] = "after"
    task: TaskName = Field(description="The task this one follows.")
    on: list[EndStatus] = Field(
        default_factory=lambda: cast(list[EndStatus], ["success"]),
        min_length=1,
        description="The statuses of the upstream task's unit that start this task for the user.",
    )
    delay_seconds: int = Field(
        default=0,
        ge=0,
        le=7 * 24 * 3600,
        description="Run this long after the upstream task's result for the user.",
    )

    @field_validator("on")
    @classmethod
    def _unique_statuses(cls, value: list[EndStatus]) -> list[EndStatus]:
        return list(dict.fromkeys(value))

    @property
    def start_jitter_seconds(self) -> int:
        return 0

    @property
    def summary(self) -> str:
        on = "" if self.on == ["success"] else f" ({', '.join(self.on)})"
        delay = f" +{self.delay_seconds}s" if self.delay_seconds else ""
        return f"after {self.task}{on}{delay}"


Trigger = Annotated[CronTrigger | IdleTrigger | AfterTrigger, Field(discriminator="type")]


class Budget(StrictInput):
    """Tokens a run may spend, checked before each model call."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_tokens_per_user: int | None = Field(default=None, ge=1)
    max_tokens_per_run: int | None = Field(default=None, ge=1)


# the reasons a unit is retried for by default: the provider's or the infrastructure's
# trouble, which may be gone next time
TRANSIENT_REASONS = (
    EndReason.RATE_LIMITED,
    EndReason.TIMEOUT,
    EndReason.PROVIDER_ERROR,
    EndReason.INVALID_REPLY,
    EndReason.WORKER_LOST,
    EndReason.INTERRUPTED,
)
# never retried: another attempt would spend again what was not allowed, or undo a decision
NEVER_RETRIED = frozenset(
    {
        EndReason.FINISHED,
        EndReason.BUDGET_EXCEEDED,
        EndReason.MAX_TURNS,
        EndReason.REPEATING,
        EndReason.CANCELLED,
    }
)


class RetryPolicy(StrictInput):
    """How a user whose attempt failed is tried again within the same run: attempt n+1 is
    due `backoff_seconds * backoff_factor**(n-1)` after attempt n ended (at most
    `max_backoff_seconds`; with `jitter`, between half that and that), or later if the
    provider's Retry-After asks for more. `{"max_attempts": 1}`: no retries."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff_seconds: float = Field(default=30.0, ge=0, le=24 * 3600)
    backoff_factor: float = Field(default=2.0, ge=1, le=10)
    max_backoff_seconds: float = Field(default=900.0, ge=0, le=7 * 24 * 3600)
    jitter: bool = True
    on: list[EndReason] = Field(
        default_factory=lambda: list(TRANSIENT_REASONS),
        max_length=len(EndReason),
        description=(
            "The reasons a failed attempt is retried for. Default: rate_limited, timeout, "
            "provider_error, invalid_reply, worker_lost, interrupted. budget_exceeded, "
            "max_turns, repeating, cancelled and finished are never retried."
        ),
    )

    @field_validator("on", mode="before")
    @classmethod
    def _reasons(cls, value: object) -> object:
        # strict mode takes an enum's value only as the enum: read the names sent
        if isinstance(value, list):
            return [
                EndReason(item) if isinstance(item, str) and item in _REASON_VALUES else item
                for item in cast("list[object]", value)
            ]
        return value

    @field_validator("on")
    @classmethod
    def _retryable(cls, value: list[EndReason]) -> list[EndReason]:
        never = sorted(reason.value for reason in value if reason in NEVER_RETRIED)
        if never:
            raise ValueError(f"{', '.join(never)} cannot be retried")
        return list(dict.fromkeys(value))

    def delay(self, attempt: int, draw: float) -> float:
        """Seconds from the end of attempt `attempt` (1-based) to the next; `draw` in [0, 1)
        picks the point in the jitter's range."""
        base = min(
            self.backoff_seconds * self.backoff_factor ** (attempt - 1), self.max_backoff_seconds
        )
        return base * (0.5 + draw / 2) if self.jitter else base


_REASON_VALUES = {reason.value for reason in EndReason}
NO_RETRIES = RetryPolicy(max_attempts=1)


def retry_draw(run_id: str, user_id: str, attempt: int) -> float:
    """The jitter's draw for a unit's retry, in [0, 1): the same in every process."""
    key = f"{run_id}|{user_id}|{attempt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


@dataclass(frozen=True, slots=True)
class NextState:
    """Where a unit goes after an attempt ended: a final status, or `retrying` due at
    `due_at`."""

    status: UserStatus
    due_at: datetime | None = None


def next_state(
    reason: EndReason,
    *,
    proposals: int,
    attempts: int,
    policy: RetryPolicy,
    now: datetime,
    draw: float = 0.0,
    retry_after: float | None = None,
) -> NextState:
    """The unit's next state after attempt number `attempts` ended for `reason` (with
    `proposals` made in it), under `policy`: `retrying` when it failed (or was interrupted)
    for a reason the policy retries and attempts are left, else `unit_status`'s. An
    interrupted attempt (a shutdown, a crash) is due again at once; otherwise after the
    policy's backoff, or the provider's `retry_after` seconds if that is longer."""
    status = unit_status(reason, proposals=proposals)
    retryable = status in (UserStatus.FAILED, UserStatus.INTERRUPTED) and reason in policy.on
    if not retryable or attempts >= policy.max_attempts:
        return NextState(status)
    wait = 0.0 if reason is EndReason.INTERRUPTED else policy.delay(max(attempts, 1), draw)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return NextState(UserStatus.RETRYING, now + timedelta(seconds=wait))


IDLE_EPISODE_MESSAGES = 50
MAX_EPISODE_MESSAGES = 500


class TaskDefinition(StrictInput):
    """What a background task does, for whom, and when."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: TaskName
    system_prompt: str = Field(min_length=1, max_length=100_000)
    tools: list[str] = Field(default_factory=list[str], max_length=20)
    memory_blocks: list[Label] = Field(default_factory=list[str], max_length=50)
    trigger: Trigger
    user_ids: list[UserId] = Field(
        max_length=1_000_000, json_schema_extra={"minItems": 1}, description="At least one."
    )
    batch_size: int = Field(default=5, ge=1, le=1000)
    max_turns: int = Field(default=10, ge=1, le=100)
    timeout_seconds: float = Field(default=300.0, gt=0, le=24 * 3600)
    misfire_grace_seconds: int = Field(default=300, ge=0, le=7 * 24 * 3600)
    budget: Budget | None = None
    episode_messages: int | None = Field(
        default=None,
        ge=0,
        le=MAX_EPISODE_MESSAGES,
        description=(
            "How many of the user's messages since the task last ran for them the agent gets "
            f"in its input (newest last; 0: none). Default: {IDLE_EPISODE_MESSAGES} for idle "
            "runs, 0 for the others."
        ),
    )
    approval: Literal["required", "auto"] = Field(
        default="required",
        description=(
            "auto: the task's proposals are approved at once by system:auto, through the same "
            "path as a person's (history, conflicts); one that conflicts stays pending. For "
            "tasks a team trusts. A dry run's proposals are previews either way."
        ),
    )
    mode: Literal["agent", "extract"] = Field(
        default="agent",
        description=(
            "agent: a multi-turn agent with the task's tools. extract: one structured model "
            "call per user returns the edits to the task's memory blocks as JSON (no tools; "
            "for small models, and about a twentieth of the tokens)."
        ),
    )
    new_blocks: bool = Field(
        default=False,
        description=(
            "extract: the model may propose blocks the task does not list. Otherwise it may "
            "edit only `memory_blocks` (or, when none are listed, the user's existing blocks)."
        ),
    )
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy,
        description=(
            "Retries of a user whose attempt failed, within the run: "
            '{"max_attempts": 1} switches them off.'
        ),
    )
    enabled: bool = True

    def for_trigger(self, trigger: TriggerType) -> TaskDefinition:
        """The definition a run of `trigger` executes: `episode_messages` resolved to a
        number (an idle run's default differs from the others')."""
        if self.episode_messages is not None:
            return self
        default = IDLE_EPISODE_MESSAGES if trigger is TriggerType.IDLE else 0
        return self.model_copy(update={"episode_messages": default})

    @classmethod
    def from_stored(cls, data: dict[str, object], user_ids: list[str]) -> TaskDefinition:
        """A definition read back from the database (see `STORED`), with its users, which
        were checked when they were written (a 100,000-user task is not checked again)."""
        definition = cls.model_validate({**data, "user_ids": []}, context={STORED: True})
        return definition.model_copy(update={"user_ids": user_ids})

    @field_validator("system_prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("system_prompt must not be blank")
        return value

    @field_validator("user_ids")
    @classmethod
    def _unique_users(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # a snapshot of a run's task is stored without its users
        if not value and not (info.context and info.context.get(STORED)):
            raise ValueError("list at least one user (a task runs for the users it lists)")
        return unique_user_ids(value)

    @field_validator("tools", "memory_blocks")
    @classmethod
    def _unique_names(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names must be unique")
        return value


class TriggerType(StrEnum):
    CRON = "cron"
    IDLE = "idle"
    MANUAL = "manual"
    RERUN = "rerun"  # the users a crash or a shutdown left unfinished in another run
    RETRY = "retry"  # a replay of the users another run ended `failed` (`retry_of`)
    AFTER = "after"  # the users whose unit of the task it follows ended (its `after` trigger)


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    PARTIAL = "partial"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    MISSED = "missed"


class UserStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    BUDGET_EXCEEDED = "budget_exceeded"  # stopped before a model call the budget did not allow
    # an attempt failed and another is due (at `next_attempt_at`)
    RETRYING = "retrying"


# the statuses of a user that may still run in its run
WAITING_USER = (UserStatus.PENDING, UserStatus.RETRYING)


FINISHED_RUN = {
    RunStatus.SUCCESS,
    RunStatus.FAILED,
    RunStatus.PARTIAL,
    RunStatus.CANCELLED,
    RunStatus.INTERRUPTED,
    RunStatus.MISSED,
}


# Every change of a user's status in a run, from -> allowed targets. The run store writes
# each change conditional on the user being in one of the sources of its target.
USER_TRANSITIONS: dict[UserStatus, frozenset[UserStatus]] = {
    # started; or never started: a cancel, a shutdown, a spent budget, a lost worker, or
    # `skipped` when created: a cron slot in local time for a user who already ran on that
    # local day before moving to another timezone
    UserStatus.PENDING: frozenset(
        {
            UserStatus.RUNNING,
            UserStatus.SKIPPED,
            UserStatus.CANCELLED,
            UserStatus.INTERRUPTED,
            UserStatus.BUDGET_EXCEEDED,
            UserStatus.FAILED,
        }
    ),
    # the agent's outcome; or `skipped`: another run holds the (task, user) lock
    UserStatus.RUNNING: frozenset(
        {
            UserStatus.SUCCESS,
            UserStatus.FAILED,
            UserStatus.CANCELLED,
            UserStatus.INTERRUPTED,
            UserStatus.BUDGET_EXCEEDED,
            UserStatus.SKIPPED,
            UserStatus.RETRYING,
        }
    ),
    # the next attempt, due at its time; or ended while waiting for it, as a pending user
    UserStatus.RETRYING: frozenset(
        {
            UserStatus.RUNNING,
            UserStatus.CANCELLED,
            UserStatus.INTERRUPTED,
            UserStatus.BUDGET_EXCEEDED,
            UserStatus.FAILED,
        }
    ),
}


def unit_status(reason: EndReason, *, proposals: int) -> UserStatus:
    """The status a unit ends in, from why it ended: `success` when it finished, or when
    `max_turns` or its timeout stopped it after it made proposals (what it did is kept for
    review); `budget_exceeded`, `cancelled`, `interrupted` (a shutdown, a crash) as named;
    `failed` otherwise (an error, a lost worker, or stopped with nothing done)."""
    if reason is EndReason.FINISHED:
        return UserStatus.SUCCESS
    if reason in (EndReason.MAX_TURNS, EndReason.TIMEOUT, EndReason.REPEATING) and proposals > 0:
        return UserStatus.SUCCESS
    named = {
        EndReason.BUDGET_EXCEEDED: UserStatus.BUDGET_EXCEEDED,
        EndReason.CANCELLED: UserStatus.CANCELLED,
        EndReason.INTERRUPTED: UserStatus.INTERRUPTED,
    }
    return named.get(reason, UserStatus.FAILED)


# the reason recorded with a status set without one (users ended together: a cancel, a
# shutdown, a spent budget)
REASON_OF_STATUS = {
    UserStatus.CANCELLED: EndReason.CANCELLED,
    UserStatus.INTERRUPTED: EndReason.INTERRUPTED,
    UserStatus.BUDGET_EXCEEDED: EndReason.BUDGET_EXCEEDED,
}


def user_sources(target: UserStatus) -> list[str]:
    """The statuses a user may move to `target` from, as stored values."""
    return [source.value for source, targets in USER_TRANSITIONS.items() if target in targets]


def final_run_status(
    counts: dict[str, int], *, cancel_requested: bool, error: str | None
) -> RunStatus:
    """A finished run's status from its users' statuses: `interrupted` if any user was cut
    short by a shutdown (or is still running in a worker the stopping server no longer waits
    for), `cancelled` after a cancel, else success / partial / failed."""
    succeeded = counts.get(UserStatus.SUCCESS, 0)
    failed = counts.get(UserStatus.FAILED, 0)
    cancelled = counts.get(UserStatus.CANCELLED, 0)
    exceeded = counts.get(UserStatus.BUDGET_EXCEEDED, 0)
    if any(counts.get(s, 0) for s in (UserStatus.INTERRUPTED, UserStatus.RUNNING, *WAITING_USER)):
        return RunStatus.INTERRUPTED
    if cancel_requested and cancelled:
        return RunStatus.CANCELLED
    if error is not None or (failed and not succeeded and not exceeded):
        return RunStatus.FAILED
    if failed or cancelled or exceeded:
        return RunStatus.PARTIAL
    return RunStatus.SUCCESS


def jitter_offset(task_name: str, slot: datetime, user_id: str, jitter_seconds: int) -> float:
    """A user's start delay after a cron slot, in [0, jitter_seconds) to the millisecond:
    the same for the same (task, slot, user) in every process, spread evenly over users."""
    if jitter_seconds <= 0:
        return 0.0
    key = f"{task_name}|{slot.isoformat()}|{user_id}".encode()
    draw = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return (draw % (jitter_seconds * 1000)) / 1000


def schedule_restarts(current: TaskDefinition, new: TaskDefinition) -> bool:
    """Whether replacing `current` by `new` restarts the schedule from now (no immediate fire
    for slots in between): the trigger changed, or the task is enabled again."""
    return current.trigger != new.trigger or (new.enabled and not current.enabled)


@dataclass(frozen=True, slots=True)
class StoredTask:
    definition: TaskDefinition
    created_at: datetime
    updated_at: datetime
    schedule_from: datetime
    revision: int


@dataclass(frozen=True, slots=True)
class TaskRun:
    id: str
    task_name: str
    trigger_type: TriggerType
    status: RunStatus
    slot_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    heartbeat_at: datetime | None
    owner: str | None
    cancel_requested: bool
    user_total: int
    counts: dict[str, int]
    input_tokens: int
    output_tokens: int
    total_tokens: int
    error: str | None
    rerun_of: str | None = None  # for a rerun: the interrupted run it continues
    retry_of: str | None = None  # for a retry: the run whose failed users it runs again
    cost_usd: float | None = None
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a (run, user) unit: the ones retried, then the latest (running, or the
    user's result)."""

    attempt: int
    started_at: datetime | None
    completed_at: datetime | None
    reason: str | None
    error: str | None
    turns_used: int
    tool_calls: int
    proposals_created: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: float | None
    transcript: str | None


@dataclass(frozen=True, slots=True)
class UserResult:
    run_id: str
    user_id: str
    position: int
    status: UserStatus
    attempts: int
    started_at: datetime | None
    completed_at: datetime | None
    turns_used: int
    tool_calls: int
    proposals_created: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    error: str | None
    transcript: str | None
    rate_limit_wait_seconds: float = 0.0
    tokens_estimated: bool = False
    cost_usd: float | None = None
    jitter_seconds: float = 0.0
    # what stopped the agent before it finished (max_turns, timeout, budget); a `success`
    # with one made its proposals, then ran out
    stopped_by: str | None = None
    # why the unit ended (an EndReason's value; None: not ended, or ended before reasons)
    reason: str | None = None
    # `retrying`: when the next attempt is due
    next_attempt_at: datetime | None = None
    # proposals its agent made that a reviewer had rejected before: not created again
    proposals_refused: int = 0
