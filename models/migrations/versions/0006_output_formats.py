"""Extra output formats per target: a combined PEM and a PKCS#12 keystore.

``targets.combined_pem`` (false for every existing target) and
``targets.pkcs12_credential_id`` (empty: no keystore), and a new credential kind,
``pkcs12_password``, added to the ``credential_kind`` CHECK (the kinds are VARCHAR + CHECK,
not a native enum type, on both SQLite and PostgreSQL: see models.entities._enum).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_KINDS_BEFORE = "kind IN ('kubeconfig', 'webhook_hmac')"
_KINDS_AFTER = "kind IN ('kubeconfig', 'webhook_hmac', 'pkcs12_password')"


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("credentials") as batch:
        batch.drop_constraint(batch.f("ck_credentials_credential_kind"), type_="check")
        batch.create_check_constraint("credential_kind", _KINDS_AFTER)
    with op.batch_alter_table("targets") as batch:
        batch.add_column(
            sa.Column("combined_pem", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("pkcs12_credential_id", sa.String(length=36), nullable=True))
        batch.create_foreign_key(
            batch.f("fk_targets_pkcs12_credential_id_credentials"),
            "credentials",
            ["pkcs12_credential_id"],
            ["id"],
        )
        batch.create_index(
            batch.f("ix_targets_pkcs12_credential_id"), ["pkcs12_credential_id"], unique=False
        )


def downgrade() -> None:
    """Revert this revision (refused while a password credential exists: it would not fit)."""
    stored = op.get_bind().scalar(
        sa.text("SELECT count(*) FROM credentials WHERE kind = 'pkcs12_password'")
    )
    if stored:
        raise RuntimeError(
            f"cannot downgrade below revision {revision}: {stored} PKCS#12 password "
            "credential(s) exist, which the older schema cannot hold; delete the targets' "
            "keystore settings and those credentials first"
        )
    with op.batch_alter_table("targets") as batch:
        batch.drop_index(batch.f("ix_targets_pkcs12_credential_id"))
        batch.drop_constraint(
            batch.f("fk_targets_pkcs12_credential_id_credentials"), type_="foreignkey"
        )
        batch.drop_column("pkcs12_credential_id")
        batch.drop_column("combined_pem")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_constraint(batch.f("ck_credentials_credential_kind"), type_="check")
        batch.create_check_constraint("credential_kind", _KINDS_BEFORE)
