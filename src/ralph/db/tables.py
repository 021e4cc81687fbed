"""Table definitions. The migrations in `migrations/versions` create exactly these."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

from ralph.db.types import LongText, UTCDateTime

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

USER = 128
LABEL = 64
TASK = 64
UUID = 36
AUTHOR = 160

# --- memory -------------------------------------------------------------------------------

memory_blocks = Table(
    "memory_blocks",
    metadata,
    Column("user_id", String(USER), primary_key=True),
    Column("label", String(LABEL), primary_key=True),
    Column("title", String(255), nullable=False),
    Column("body", LongText(), nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# Every version of every block, the current one included. The primary key makes two writers
# producing the same version impossible.
memory_block_versions = Table(
    "memory_block_versions",
    metadata,
    Column("user_id", String(USER), primary_key=True),
    Column("label", String(LABEL), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("title", String(255), nullable=False),
    Column("body", LongText(), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("author", String(AUTHOR), nullable=False),
    Column("proposal_id", String(UUID), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

proposals = Table(
    "proposals",
    metadata,
    Column("id", String(UUID), primary_key=True),
    Column("user_id", String(USER), nullable=False),
    Column("label", String(LABEL), nullable=False),
    Column("kind", String(16), nullable=False),  # "body" | "replace"
    Column("title", String(255), nullable=True),
    Column("body", LongText(), nullable=True),
    Column("old_text", LongText(), nullable=True),
    Column("new_text", LongText(), nullable=True),
    Column("reason", Text(), nullable=False),
    Column("author", String(AUTHOR), nullable=False),
    Column("run_id", String(UUID), nullable=True),
    Column("base_version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("diff", LongText(), nullable=False),
    Column("comment", Text(), nullable=True),
    Column("applied_version", Integer, nullable=True),
    Column("idempotency_key", String(64), nullable=True, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("decided_at", UTCDateTime(), nullable=True),
    Column("decided_by", String(AUTHOR), nullable=True),
    Column("superseded_by", String(UUID), nullable=True),
    # approved with the reviewer's version of the change: that text (the proposal keeps the
    # author's)
    Column("edited", Boolean, nullable=False, server_default=false()),
    Column("applied_text", LongText(), nullable=True),
    # an agent's proposal: what it was based on (JSON of `Evidence`)
    Column("evidence", LongText(), nullable=True),
    Index(None, "user_id", "status", "created_at"),
    Index(None, "status", "created_at"),  # the review queue across users
    Index(None, "run_id"),
    # an author's proposals by time: a task's stats, what reviewers corrected of its agents'
    Index(None, "author", "created_at"),
)

# --- conversations ------------------------------------------------------------------------

# the full-text index of messages' content (migration 0017), made outside the metadata: its
# form differs by database (SQLite: an FTS5 table with shadow tables named after it; MySQL:
# a FULLTEXT index; PostgreSQL: a GIN index of an expression)
MESSAGE_SEARCH = "messages_fts"
MESSAGE_SEARCH_INDEX = "ix_messages_content_text"


def outside_metadata(name: str | None) -> bool:
    """Whether a table or index is the search index's, which schema comparisons skip."""
    return bool(name) and (name == MESSAGE_SEARCH_INDEX or str(name).startswith(MESSAGE_SEARCH))


def compared(name: str | None, _kind: str, _parents: object) -> bool:
    """Alembic's `include_name`: what a schema comparison looks at."""
    return not outside_metadata(name)


messages = Table(
    "messages",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("user_id", String(USER), nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", LongText(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index(None, "user_id", "id"),
)

user_activity = Table(
    "user_activity",
    metadata,
    Column("user_id", String(USER), primary_key=True),
    Column("last_message_at", UTCDateTime(), nullable=False, index=True),
)

# --- users --------------------------------------------------------------------------------

user_profiles = Table(
    "user_profiles",
    metadata,
    Column("user_id", String(USER), primary_key=True),
    Column("timezone", String(64), nullable=True),  # IANA name; NULL: the task's default
    Column("metadata", LongText(), nullable=False),  # JSON object
    # when `timezone` last changed: cron in users' local time looks at recent moves only
    Column("timezone_changed_at", UTCDateTime(), nullable=True, index=True),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# --- background tasks ---------------------------------------------------------------------

background_tasks = Table(
    "background_tasks",
    metadata,
    Column("name", String(TASK), primary_key=True),
    Column("definition", LongText(), nullable=False),  # JSON of the task, minus user ids
    Column("trigger_type", String(16), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("user_count", Integer, nullable=False),
    # Slots at or before this instant never fire: set on create, enable and trigger change.
    Column("schedule_from", UTCDateTime(), nullable=False),
    Column("revision", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    # Idle tasks: activity at or before this instant has been examined; the next scan reads
    # only activity after it. `after` tasks: the upstream task's results ended before it
    # have been followed. NULL: scan everything once (new task, changed users/trigger).
    Column("idle_watermark", UTCDateTime(), nullable=True),
)

# A task's explicit users, one row each: idle selection joins on it.
task_users = Table(
    "task_users",
    metadata,
    Column("task_name", String(TASK), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("position", Integer, nullable=False),
    Index(None, "task_name", "position"),
)

task_runs = Table(
    "task_runs",
    metadata,
    Column("id", String(UUID), primary_key=True),
    Column("task_name", String(TASK), nullable=False),
    Column("trigger_type", String(16), nullable=False),
    # "cron:<slot iso>" for cron runs, "idle:<tick iso>" for idle runs; unique per task, so a
    # slot claimed by one replica cannot be claimed by another.
    Column("slot_key", String(64), nullable=True),
    Column("slot_at", UTCDateTime(), nullable=True),
    Column("status", String(16), nullable=False),
    Column("task_snapshot", LongText(), nullable=False),
    Column("owner", String(64), nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("user_total", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("completed_at", UTCDateTime(), nullable=True),
    Column("heartbeat_at", UTCDateTime(), nullable=True),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("total_tokens", BigInteger, nullable=False, default=0),
    Column("cost_usd", Float, nullable=True),  # the users' costs summed; None: unknown
    Column("error", Text(), nullable=True),
    # a manual run that only previews: its proposals are previews, and no later run counts
    # it as the task having run for its users
    Column("dry_run", Boolean, nullable=False, server_default=false()),
    # a retry run (trigger "retry"): the run whose failed users it runs again
    Column("retry_of", String(UUID), nullable=True),
    UniqueConstraint("task_name", "slot_key"),
    Index(None, "task_name", "created_at"),
    Index(None, "task_name", "completed_at"),  # the runs an `after` task's pass looks at
    Index(None, "status", "heartbeat_at"),
)

task_run_users = Table(
    "task_run_users",
    metadata,
    Column("run_id", String(UUID), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("completed_at", UTCDateTime(), nullable=True),
    Column("turns_used", Integer, nullable=False, default=0),
    Column("tool_calls", Integer, nullable=False, default=0),
    Column("proposals_created", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("total_tokens", BigInteger, nullable=False, default=0),
    Column("error", Text(), nullable=True),
    Column("transcript", LongText(), nullable=True),
    # proposals its agent made that a reviewer had rejected before (not created again)
    Column("proposals_refused", Integer, nullable=False, server_default="0"),
    # time the user's agent waited for the model rate limit (not counted against its timeout)
    Column("rate_limit_wait_seconds", Float, nullable=False, server_default="0"),
    # the provider reported no usage: the tokens are estimated from the text (4 chars each)
    Column("tokens_estimated", Boolean, nullable=False, server_default=false()),
    Column("cost_usd", Float, nullable=True),  # as the provider reports it; None: unknown
    # a cron run's start delay for this user, from its task's `jitter_seconds`
    Column("jitter_seconds", Float, nullable=False, server_default="0"),
    # what stopped the agent before it finished: max_turns, timeout, budget (None: it did)
    Column("stopped_by", String(16), nullable=True),
    # why the unit ended (ralph.reasons.EndReason); None before it ended
    Column("reason", String(16), nullable=True),
    # when the user may start: its next attempt (status retrying) or a cron run's jittered
    # start (None: at once)
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Index(None, "run_id", "status", "position"),
    Index(None, "run_id", "position"),
    Index(None, "user_id", "started_at"),  # when a task last ran for a user
)

# A (run, user) unit's attempts that were followed by another (retried): the user's row keeps
# the latest attempt, these the ones before it.
unit_attempts = Table(
    "unit_attempts",
    metadata,
    Column("run_id", String(UUID), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("completed_at", UTCDateTime(), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("error", Text(), nullable=True),
    Column("turns_used", Integer, nullable=False),
    Column("tool_calls", Integer, nullable=False),
    Column("proposals_created", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("cost_usd", Float, nullable=True),
    Column("transcript", LongText(), nullable=True),
)

# An `after` task's claim of one upstream result (the upstream run, the user): the key makes
# it true for one caller across replicas; `run_id` is the run of the following task it went to.
task_chain_claims = Table(
    "task_chain_claims",
    metadata,
    Column("task_name", String(TASK), primary_key=True),
    Column("upstream_run_id", String(UUID), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("run_id", String(UUID), nullable=False),
    Column("claimed_at", UTCDateTime(), nullable=False),
    Index(None, "run_id", "user_id"),
)

# One row while a (task, user) agent is in flight: the key makes a second one impossible.
task_user_locks = Table(
    "task_user_locks",
    metadata,
    Column("task_name", String(TASK), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("run_id", String(UUID), nullable=False),
    Column("acquired_at", UTCDateTime(), nullable=False),
    Index(None, "run_id"),
)

# Idle trigger state per (task, user): which message the last fired episode covered.
idle_state = Table(
    "idle_state",
    metadata,
    Column("task_name", String(TASK), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("episode_message_at", UTCDateTime(), nullable=False),
    Column("last_run_at", UTCDateTime(), nullable=False),
)

# Idle users whose episode is due but held back by the cooldown, and when to look again.
idle_deferred = Table(
    "idle_deferred",
    metadata,
    Column("task_name", String(TASK), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("due_at", UTCDateTime(), nullable=False),
    Index(None, "task_name", "due_at"),
)

# Idle tasks with `max_wait_minutes`: when each armed user's episode started (the first
# activity the scheduler saw), so it fires max_wait after that even if the user never idles.
idle_pending = Table(
    "idle_pending",
    metadata,
    Column("task_name", String(TASK), primary_key=True),
    Column("user_id", String(USER), primary_key=True),
    Column("since", UTCDateTime(), nullable=False),
    Index(None, "task_name", "since"),
)

scheduler_replicas = Table(
    "scheduler_replicas",
    metadata,
    Column("replica_id", String(64), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("last_tick_at", UTCDateTime(), nullable=True),
)

# Webhook events, written in the transaction of the change they report (a transactional
# outbox) and delivered by the server's sender, at least once, each under its id.
webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("id", String(UUID), primary_key=True),
    Column("event_type", String(64), nullable=False),
    Column("body", LongText(), nullable=False),  # the exact JSON that is signed and sent
    Column("created_at", UTCDateTime(), nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("delivered_at", UTCDateTime(), nullable=True),
    Column("last_error", Text(), nullable=True),
    Index(None, "status", "next_attempt_at"),
)

# Console sessions ended by logging out, until they would have expired anyway: a session is a
# signed cookie, valid by itself; its signature here makes it invalid.
revoked_sessions = Table(
    "revoked_sessions",
    metadata,
    Column("signature", String(64), primary_key=True),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index(None, "expires_at"),
)
