"""per user: what stopped the agent before it finished (max_turns, timeout, budget), and why
the unit ended (its reason)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_run_users") as batch:
        batch.add_column(sa.Column("stopped_by", sa.String(16), nullable=True))
        batch.add_column(sa.Column("reason", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task_run_users") as batch:
        batch.drop_column("reason")
        batch.drop_column("stopped_by")
