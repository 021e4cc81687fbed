"""review: a proposal approved with the reviewer's version of its change, the evidence an
agent's proposal was based on, proposals by author and time (a task's stats)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ralph.db.types import LongText

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("proposals") as batch:
        batch.add_column(
            sa.Column("edited", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("applied_text", LongText(), nullable=True))
        batch.add_column(sa.Column("evidence", LongText(), nullable=True))
    op.create_index("ix_proposals_author_created_at", "proposals", ["author", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_proposals_author_created_at", table_name="proposals")
    with op.batch_alter_table("proposals") as batch:
        batch.drop_column("evidence")
        batch.drop_column("applied_text")
        batch.drop_column("edited")
