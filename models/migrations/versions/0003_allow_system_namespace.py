"""Targets say whether they may write into a system namespace.

``targets.allow_system_namespace`` (false for every existing target): kube-system,
kube-public and kube-node-lease are refused unless a target allows them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("targets") as batch:
        batch.add_column(
            sa.Column(
                "allow_system_namespace",
                sa.Boolean(),
                server_default=sa.false(),
                nullable=False,
            )
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("targets") as batch:
        batch.drop_column("allow_system_namespace")
