"""Verify serving: endpoints on targets, require-serving on groups, the outcome on results.

``targets.serving_endpoints`` (empty for every existing target: nothing is verified until
an operator names endpoints), ``serving_deadline_seconds``, ``serving_ca``,
``serving_public_only``; ``target_groups.require_serving`` (off); and
``target_results.serving_status`` / ``serving`` (empty for every existing result).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("targets") as batch:
        batch.add_column(
            sa.Column("serving_endpoints", _json(), server_default="[]", nullable=False)
        )
        batch.add_column(sa.Column("serving_deadline_seconds", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("serving_ca", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column(
                "serving_public_only", sa.Boolean(), server_default=sa.false(), nullable=False
            )
        )
    with op.batch_alter_table("target_groups") as batch:
        batch.add_column(
            sa.Column("require_serving", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("target_results") as batch:
        batch.add_column(sa.Column("serving_status", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("serving", _json(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("target_results") as batch:
        batch.drop_column("serving")
        batch.drop_column("serving_status")
    with op.batch_alter_table("target_groups") as batch:
        batch.drop_column("require_serving")
    with op.batch_alter_table("targets") as batch:
        batch.drop_column("serving_public_only")
        batch.drop_column("serving_ca")
        batch.drop_column("serving_deadline_seconds")
        batch.drop_column("serving_endpoints")
