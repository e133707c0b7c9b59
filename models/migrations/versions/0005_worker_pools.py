"""Worker pools: targets name the pool that processes them; workers record heartbeats per pool.

``targets.pool`` ("default" for every existing target), ``targets.cluster_identity`` (empty
until an in-cluster target's first health check or run in its pool records it), and the
``worker_heartbeats`` table written by each worker's housekeeper.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("targets") as batch:
        batch.add_column(
            sa.Column("pool", sa.String(length=63), server_default="default", nullable=False)
        )
        batch.add_column(sa.Column("cluster_identity", sa.String(length=80), nullable=True))
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("pool", sa.String(length=63), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("worker", name=op.f("pk_worker_heartbeats")),
    )
    with op.batch_alter_table("worker_heartbeats") as batch:
        batch.create_index(batch.f("ix_worker_heartbeats_pool"), ["pool"], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("worker_heartbeats") as batch:
        batch.drop_index(batch.f("ix_worker_heartbeats_pool"))
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("targets") as batch:
        batch.drop_column("cluster_identity")
        batch.drop_column("pool")
