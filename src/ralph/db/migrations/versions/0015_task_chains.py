"""task chains: an `after` task's claims of upstream results, runs by completion time

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ralph.db.types import UTCDateTime

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_chain_claims",
        sa.Column("task_name", sa.String(64), nullable=False),
        sa.Column("upstream_run_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("claimed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "task_name", "upstream_run_id", "user_id", name="pk_task_chain_claims"
        ),
    )
    op.create_index(
        "ix_task_chain_claims_run_id_user_id", "task_chain_claims", ["run_id", "user_id"]
    )
    op.create_index(
        "ix_task_runs_task_name_completed_at", "task_runs", ["task_name", "completed_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_task_runs_task_name_completed_at", table_name="task_runs")
    op.drop_index("ix_task_chain_claims_run_id_user_id", table_name="task_chain_claims")
    op.drop_table("task_chain_claims")
