"""idle watermark and deferred idle users

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 13:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ralph.db.types

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("background_tasks") as batch_op:
        batch_op.add_column(
            sa.Column("idle_watermark", ralph.db.types.UTCDateTime(), nullable=True)
        )
    op.create_table(
        "idle_deferred",
        sa.Column("task_name", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("due_at", ralph.db.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("task_name", "user_id", name=op.f("pk_idle_deferred")),
    )
    op.create_index(
        op.f("ix_idle_deferred_task_name_due_at"), "idle_deferred", ["task_name", "due_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_idle_deferred_task_name_due_at"), table_name="idle_deferred")
    op.drop_table("idle_deferred")
    with op.batch_alter_table("background_tasks") as batch_op:
        batch_op.drop_column("idle_watermark")
