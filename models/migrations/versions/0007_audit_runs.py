"""Audit runs: the run action ``audit``, its result statuses and the deployed leaf per result.

* ``runs.action`` may be ``audit`` (a read-only run: one GET per target).
* ``target_results.status`` may be ``current``, ``outdated``, ``drifted``, ``unmanaged`` or
  ``missing`` (what an audit found; a target it could not read is ``failed`` as before).
* ``target_results.deployed_serial`` / ``deployed_not_after``: the first certificate of the
  live ``tls.crt`` an audit read; ``target_results.finding``: the audit's JSON finding
  (state, detail, fingerprint, revision, writer). NULL for every other run and existing row.

The enumerations are VARCHAR + CHECK constraints (revision 0001), not PostgreSQL ENUM types,
so adding values replaces two CHECK constraints (no ``ALTER TYPE ... ADD VALUE``, which could
not run inside Alembic's transaction on older PostgreSQL). A downgrade refuses while audit
rows exist rather than deleting them silently; delete them first (the message says how).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Written out here (not read from the models) so this revision keeps meaning what it meant.
_ACTIONS_BEFORE = "'dry_run', 'execute', 'rollback', 'health_check'"
_ACTIONS_AFTER = _ACTIONS_BEFORE + ", 'audit'"
_STATUSES_BEFORE = (
    "'pending', 'running', 'created', 'updated', 'unchanged', 'failed', 'skipped', "
    "'rolled_back', 'would_create', 'would_update'"
)
_AUDIT_STATUSES = "'current', 'outdated', 'drifted', 'unmanaged', 'missing'"
_STATUSES_AFTER = _STATUSES_BEFORE + ", " + _AUDIT_STATUSES


def _checks(actions: str, statuses: str) -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_run_action"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_run_action"), f"action IN ({actions})")
    with op.batch_alter_table("target_results") as batch:
        batch.drop_constraint(op.f("ck_target_results_result_status"), type_="check")
        batch.create_check_constraint(
            op.f("ck_target_results_result_status"), f"status IN ({statuses})"
        )


def upgrade() -> None:
    """Apply this revision."""
    json_type = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")
    with op.batch_alter_table("target_results") as batch:
        batch.add_column(sa.Column("deployed_serial", sa.String(64), nullable=True))
        batch.add_column(sa.Column("deployed_not_after", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("finding", json_type, nullable=True))
    _checks(_ACTIONS_AFTER, _STATUSES_AFTER)


def downgrade() -> None:
    """Revert this revision (refused while audit runs exist)."""
    connection = op.get_bind()
    audits = connection.execute(sa.text("SELECT count(*) FROM runs WHERE action = 'audit'"))
    count = int(audits.scalar_one())
    if count:
        raise RuntimeError(
            f"cannot downgrade below revision 0007: {count} audit run(s) exist, which the older "
            "schema cannot hold; delete them first (the rows of table runs whose action is "
            "'audit'; their target results go with them)"
        )
    _checks(_ACTIONS_BEFORE, _STATUSES_BEFORE)
    with op.batch_alter_table("target_results") as batch:
        batch.drop_column("finding")
        batch.drop_column("deployed_not_after")
        batch.drop_column("deployed_serial")
