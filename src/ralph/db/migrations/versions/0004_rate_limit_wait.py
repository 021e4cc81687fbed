"""per user: time spent waiting for the model rate limit, whether its tokens are estimated,
and the provider's cost (per user and per run)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_run_users") as batch:
        batch.add_column(
            sa.Column("rate_limit_wait_seconds", sa.Float(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("tokens_estimated", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("cost_usd", sa.Float(), nullable=True))
    with op.batch_alter_table("task_runs") as batch:
        batch.add_column(sa.Column("cost_usd", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task_runs") as batch:
        batch.drop_column("cost_usd")
    with op.batch_alter_table("task_run_users") as batch:
        batch.drop_column("cost_usd")
        batch.drop_column("tokens_estimated")
        batch.drop_column("rate_limit_wait_seconds")
