"""Indexes for the scans a large run makes: open result rows, and runs newest first.

``ix_target_results_open`` (partial: pending or running rows only) serves the batch-done check
each message makes and the reaper's search for lost rows; ``ix_runs_created_at`` and
``ix_runs_distribution_id_created_at`` serve `runs list`. Indexes only: no row changes.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: Copied, not imported: a migration stays what it was when the models move on.
_OPEN_RESULT = "status IN ('pending', 'running')"


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("target_results") as batch:
        batch.create_index(
            "ix_target_results_open",
            ["run_id", "batch_index"],
            unique=False,
            postgresql_where=sa.text(_OPEN_RESULT),
            sqlite_where=sa.text(_OPEN_RESULT),
        )
    with op.batch_alter_table("runs") as batch:
        batch.create_index("ix_runs_created_at", ["created_at"], unique=False)
        batch.create_index(
            "ix_runs_distribution_id_created_at", ["distribution_id", "created_at"], unique=False
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_distribution_id_created_at")
        batch.drop_index("ix_runs_created_at")
    with op.batch_alter_table("target_results") as batch:
        batch.drop_index("ix_target_results_open")
