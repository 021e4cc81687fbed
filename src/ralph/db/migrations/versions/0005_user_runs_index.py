"""index to find when a task last ran for a user (the episode messages of its next run)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 19:45:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_task_run_users_user_id_started_at"), "task_run_users", ["user_id", "started_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_task_run_users_user_id_started_at"), table_name="task_run_users")
