"""Certificate revisions pinned by runs; leases and send times on target results.

* ``certificate_revisions``: one immutable row per version of a certificate (leaf, chain, CA,
  sealed key). Every existing certificate gets revision 1, a copy of its current content
  (the key envelope is copied as it is: it stays sealed for the certificate, so no KEK is
  needed to upgrade).
* ``runs.certificate_revision_id``: the revision a run deploys. Every existing run is pinned
  to its certificate's revision 1, which is what it would have read.
* ``target_results.sent_at`` and ``lease_expires_at``: when a pending target's message was
  sent, and until when a running target's claim holds. Existing rows get NULL; a running row
  without a lease counts as expired (upgrade with the workers stopped, as the chart's
  migration hook does).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The content columns shared by certificates and their revisions, written out here (not read
# from the models) so this revision keeps meaning what it meant when it was released.
_CONTENT = (
    "common_name, sans, serial_hex, issuer, not_before, not_after, sha256_fingerprint, "
    "leaf_pem, chain_pem, ca_pem, private_key"
)


def upgrade() -> None:
    """Apply this revision."""
    json_type = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")
    binary = sa.LargeBinary().with_variant(sa.dialects.postgresql.BYTEA(), "postgresql")
    op.create_table(
        "certificate_revisions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "certificate_id",
            sa.String(36),
            sa.ForeignKey(
                "certificates.id",
                ondelete="CASCADE",
                name="fk_certificate_revisions_certificate_id_certificates",
            ),
            nullable=False,
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("common_name", sa.String(255)),
        sa.Column("sans", json_type, nullable=False),
        sa.Column("serial_hex", sa.String(64), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sha256_fingerprint", sa.String(64), nullable=False),
        sa.Column("leaf_pem", sa.Text(), nullable=False),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("ca_pem", sa.Text()),
        sa.Column("private_key", binary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_certificate_revisions"),
        sa.UniqueConstraint(
            "certificate_id", "number", name="uq_certificate_revisions_certificate_id_number"
        ),
    )
    op.create_index(
        "ix_certificate_revisions_certificate_id", "certificate_revisions", ["certificate_id"]
    )
    connection = op.get_bind()
    certificate_ids = connection.execute(sa.text("SELECT id FROM certificates")).scalars().all()
    for certificate_id in certificate_ids:
        connection.execute(
            sa.text(
                # Constants of this module, not input.
                f"INSERT INTO certificate_revisions (id, certificate_id, number, {_CONTENT}, "  # noqa: S608
                f"created_at) SELECT :revision_id, id, 1, {_CONTENT}, created_at "
                "FROM certificates WHERE id = :certificate_id"
            ),
            {"revision_id": str(uuid.uuid4()), "certificate_id": certificate_id},
        )

    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("certificate_revision_id", sa.String(36)))
        batch.create_foreign_key(
            "fk_runs_certificate_revision_id_certificate_revisions",
            "certificate_revisions",
            ["certificate_revision_id"],
            ["id"],
        )
        batch.create_index("ix_runs_certificate_revision_id", ["certificate_revision_id"])
    connection.execute(
        sa.text(
            "UPDATE runs SET certificate_revision_id = ("
            "SELECT r.id FROM certificate_revisions r JOIN distributions d "
            "ON d.certificate_id = r.certificate_id "
            "WHERE d.id = runs.distribution_id AND r.number = 1)"
        )
    )

    with op.batch_alter_table("target_results") as batch:
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("target_results") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("sent_at")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_certificate_revision_id")
        batch.drop_constraint(
            "fk_runs_certificate_revision_id_certificate_revisions", type_="foreignkey"
        )
        batch.drop_column("certificate_revision_id")
    op.drop_index("ix_certificate_revisions_certificate_id", table_name="certificate_revisions")
    op.drop_table("certificate_revisions")
