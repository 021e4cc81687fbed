"""Alembic environment: runs on the connection `ralph.db.migrate` hands over."""

from __future__ import annotations

from alembic import context

from ralph.db.dialects import backend
from ralph.db.tables import compared, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `ralph migrate` (ralph.db.migrate)")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=backend(connection.dialect).batch_migrations,
    compare_type=True,
    include_name=compared,
)
with context.begin_transaction():
    context.run_migrations()
