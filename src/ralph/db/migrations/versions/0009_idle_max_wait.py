"""idle max wait: when each armed user's episode started

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 22:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ralph.db.types import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idle_pending",
        sa.Column("task_name", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("since", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("task_name", "user_id", name="pk_idle_pending"),
    )
    op.create_index("ix_idle_pending_task_name_since", "idle_pending", ["task_name", "since"])


def downgrade() -> None:
    op.drop_table("idle_pending")
