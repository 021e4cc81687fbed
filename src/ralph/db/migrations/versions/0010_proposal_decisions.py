"""proposals: who decided, and the proposal that superseded one

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("proposals") as batch:
        batch.add_column(sa.Column("decided_by", sa.String(160), nullable=True))
        batch.add_column(sa.Column("superseded_by", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("proposals") as batch:
        batch.drop_column("superseded_by")
        batch.drop_column("decided_by")
