"""user profiles: a timezone for cron in users' local time, and free-form metadata

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 21:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ralph.db.types import LongText, UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_profiles",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=True),
        sa.Column("metadata", LongText(), nullable=False),
        sa.Column("timezone_changed_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_profiles"),
    )
    op.create_index(
        "ix_user_profiles_timezone_changed_at", "user_profiles", ["timezone_changed_at"]
    )


def downgrade() -> None:
    op.drop_table("user_profiles")
