"""At most one mutating run (execute or rollback) per distribution is queued or running.

A partial unique index on ``runs.distribution_id`` over the active, operator- or
scheduler-requested execute and rollback runs. A database that already holds several such
runs for one distribution keeps the oldest active; the later ones end ``failed`` with a
reason that says why, before the index is created.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Written out here rather than imported: a revision must keep meaning what it meant when it
# was released, whatever the models say later.
ACTIVE_MUTATION = (
    "state IN ('queued', 'running') AND action IN ('execute', 'rollback') AND parent_run_id IS NULL"
)
SUPERSEDED = (
    "failed: another execute or rollback of this distribution was already active when the "
    "database was upgraded to allow only one at a time (revision 0002); enqueue it again"
)


def upgrade() -> None:
    """Apply this revision."""
    connection = op.get_bind()
    active = connection.execute(
        sa.text(
            # A constant of this module, not input.
            f"SELECT id, distribution_id FROM runs WHERE {ACTIVE_MUTATION} "  # noqa: S608
            "ORDER BY distribution_id, created_at, id"
        )
    ).all()
    kept: set[str] = set()
    superseded: list[str] = []
    for run_id, distribution_id in active:
        if distribution_id in kept:
            superseded.append(run_id)
        else:
            kept.add(distribution_id)
    now = datetime.now(UTC)
    for run_id in superseded:
        connection.execute(
            sa.text(
                "UPDATE runs SET state = 'failed', reason = :reason, finished_at = :now "
                "WHERE id = :id"
            ),
            {"reason": SUPERSEDED, "now": now, "id": run_id},
        )
    op.create_index(
        "uq_runs_one_active_mutation",
        "runs",
        ["distribution_id"],
        unique=True,
        postgresql_where=sa.text(ACTIVE_MUTATION),
        sqlite_where=sa.text(ACTIVE_MUTATION),
    )


def downgrade() -> None:
    """Revert this revision (the superseded runs stay failed)."""
    op.drop_index("uq_runs_one_active_mutation", table_name="runs")
