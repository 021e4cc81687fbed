"""retries: a unit's next attempt time, the attempts before its latest, a retry run's origin;
proposals refused as rejected before

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 08:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ralph.db.types import LongText, UTCDateTime

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_run_users") as batch:
        batch.add_column(sa.Column("next_attempt_at", UTCDateTime(), nullable=True))
        batch.add_column(
            sa.Column("proposals_refused", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("task_runs") as batch:
        batch.add_column(sa.Column("retry_of", sa.String(36), nullable=True))
    op.create_table(
        "unit_attempts",
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("turns_used", sa.Integer(), nullable=False),
        sa.Column("tool_calls", sa.Integer(), nullable=False),
        sa.Column("proposals_created", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("transcript", LongText(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "user_id", "attempt", name="pk_unit_attempts"),
    )


def downgrade() -> None:
    op.drop_table("unit_attempts")
    with op.batch_alter_table("task_runs") as batch:
        batch.drop_column("retry_of")
    with op.batch_alter_table("task_run_users") as batch:
        batch.drop_column("proposals_refused")
        batch.drop_column("next_attempt_at")
