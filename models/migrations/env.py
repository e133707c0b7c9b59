"""Alembic environment: runs on the connection handed in by models.migrate.

Run migrations with ``certautopilot migrate`` or ``models.migrate.upgrade(engine)``; the
``alembic`` command line is not wired up, so there is exactly one way in.
"""

from __future__ import annotations

from alembic import context

import models  # noqa: F401  (registers every table on Base.metadata)
from models.base import Base

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError(
        "run migrations through models.migrate (certautopilot migrate); offline SQL "
        "generation and the plain alembic CLI are not supported"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode recreates the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
