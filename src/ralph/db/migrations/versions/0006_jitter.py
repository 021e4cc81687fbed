"""per user of a cron run: the start delay its task's jitter gave it

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_run_users") as batch:
        batch.add_column(
            sa.Column("jitter_seconds", sa.Float(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("task_run_users") as batch:
        batch.drop_column("jitter_seconds")
