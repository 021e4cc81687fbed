"""index for the review queue of proposals across users

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 16:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_proposals_status_created_at"), "proposals", ["status", "created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_proposals_status_created_at"), table_name="proposals")
