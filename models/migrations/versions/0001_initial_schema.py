"""Initial schema: certificates, credentials, targets, groups, distributions, runs,
results and rollback snapshots.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "certificates",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("common_name", sa.String(length=255), nullable=True),
        sa.Column("sans", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("serial_hex", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sha256_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("leaf_pem", sa.Text(), nullable=False),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("ca_pem", sa.Text(), nullable=True),
        sa.Column(
            "private_key",
            sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificates")),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_certificates_sha256_fingerprint"), ["sha256_fingerprint"], unique=False
        )

    op.create_table(
        "credentials",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column(
            "secret",
            sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('kubeconfig', 'webhook_hmac')", name=op.f("ck_credentials_credential_kind")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credentials")),
        sa.UniqueConstraint("name", name=op.f("uq_credentials_name")),
    )
    op.create_table(
        "target_groups",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column(
            "batch_size", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "failure_threshold",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "variables", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_target_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_target_groups_name")),
    )
    op.create_table(
        "targets",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("module", sa.String(length=32), nullable=False),
        sa.Column("connection_mode", sa.String(length=32), nullable=False),
        sa.Column("credential_id", sa.String(length=36), nullable=True),
        sa.Column("namespace_template", sa.Text(), nullable=False),
        sa.Column("secret_name_template", sa.Text(), nullable=False),
        sa.Column("include_ca", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("allow_insecure", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("adopt_unmanaged", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column(
            "variables", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("health_status", sa.String(length=32), nullable=False),
        sa.Column("health_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("health_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(connection_mode = 'kubeconfig' AND credential_id IS NOT NULL)"
            " OR (connection_mode = 'in_cluster' AND credential_id IS NULL)",
            name=op.f("ck_targets_credential_iff_kubeconfig"),
        ),
        sa.ForeignKeyConstraint(
            ["credential_id"], ["credentials.id"], name=op.f("fk_targets_credential_id_credentials")
        ),
        sa.CheckConstraint("module IN ('kubernetes')", name=op.f("ck_targets_target_module")),
        sa.CheckConstraint(
            "connection_mode IN ('in_cluster', 'kubeconfig')",
            name=op.f("ck_targets_connection_mode"),
        ),
        sa.CheckConstraint(
            "health_status IN ('unknown', 'healthy', 'unhealthy')",
            name=op.f("ck_targets_health_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_targets")),
        sa.UniqueConstraint("name", name=op.f("uq_targets_name")),
    )
    with op.batch_alter_table("targets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_targets_credential_id"), ["credential_id"], unique=False
        )

    op.create_table(
        "distributions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("certificate_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=36), nullable=True),
        sa.Column("group_id", sa.String(length=36), nullable=True),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("webhook_credential_id", sa.String(length=36), nullable=True),
        sa.Column("store_content", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(kind = 'kubernetes'"
            " AND ((target_id IS NOT NULL AND group_id IS NULL)"
            " OR (target_id IS NULL AND group_id IS NOT NULL))"
            " AND webhook_url IS NULL AND webhook_credential_id IS NULL)"
            " OR (kind = 'webhook' AND target_id IS NULL AND group_id IS NULL"
            " AND webhook_url IS NOT NULL)",
            name=op.f("ck_distributions_destination_matches_kind"),
        ),
        sa.CheckConstraint("position >= 0", name=op.f("ck_distributions_position_not_negative")),
        sa.ForeignKeyConstraint(
            ["certificate_id"],
            ["certificates.id"],
            name=op.f("fk_distributions_certificate_id_certificates"),
        ),
        sa.ForeignKeyConstraint(
            ["group_id"], ["target_groups.id"], name=op.f("fk_distributions_group_id_target_groups")
        ),
        sa.ForeignKeyConstraint(
            ["target_id"], ["targets.id"], name=op.f("fk_distributions_target_id_targets")
        ),
        sa.ForeignKeyConstraint(
            ["webhook_credential_id"],
            ["credentials.id"],
            name=op.f("fk_distributions_webhook_credential_id_credentials"),
        ),
        sa.CheckConstraint(
            "kind IN ('kubernetes', 'webhook')", name=op.f("ck_distributions_distribution_kind")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_distributions")),
        sa.UniqueConstraint(
            "certificate_id", "position", name=op.f("uq_distributions_certificate_id_position")
        ),
    )
    with op.batch_alter_table("distributions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_distributions_group_id"), ["group_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_distributions_target_id"), ["target_id"], unique=False)

    op.create_table(
        "target_group_members",
        sa.Column("group_id", sa.String(length=36), nullable=False),
        sa.Column("target_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "position >= 0", name=op.f("ck_target_group_members_position_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["target_groups.id"],
            name=op.f("fk_target_group_members_group_id_target_groups"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["target_id"],
            ["targets.id"],
            name=op.f("fk_target_group_members_target_id_targets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "target_id", name=op.f("pk_target_group_members")),
        sa.UniqueConstraint(
            "group_id", "position", name=op.f("uq_target_group_members_group_id_position")
        ),
    )
    with op.batch_alter_table("target_group_members", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_target_group_members_target_id"), ["target_id"], unique=False
        )

    op.create_table(
        "rollback_snapshots",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("distribution_id", sa.String(length=36), nullable=False),
        sa.Column("target_id", sa.String(length=36), nullable=False),
        sa.Column("existed", sa.Boolean(), nullable=False),
        sa.Column(
            "previous",
            sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql"),
            nullable=True,
        ),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("written_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("written_resource_version", sa.String(length=64), nullable=True),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(existed AND previous IS NOT NULL) OR (NOT existed AND previous IS NULL)",
            name=op.f("ck_rollback_snapshots_previous_iff_existed"),
        ),
        sa.ForeignKeyConstraint(
            ["distribution_id"],
            ["distributions.id"],
            name=op.f("fk_rollback_snapshots_distribution_id_distributions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["target_id"], ["targets.id"], name=op.f("fk_rollback_snapshots_target_id_targets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollback_snapshots")),
        sa.UniqueConstraint(
            "distribution_id",
            "target_id",
            name=op.f("uq_rollback_snapshots_distribution_id_target_id"),
        ),
    )
    with op.batch_alter_table("rollback_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rollback_snapshots_target_id"), ["target_id"], unique=False
        )

    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("distribution_id", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("current_batch", sa.Integer(), nullable=False),
        sa.Column(
            "batch_plan", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column(
            "options", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("cascade", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("parent_run_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["distribution_id"],
            ["distributions.id"],
            name=op.f("fk_runs_distribution_id_distributions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_run_id"],
            ["runs.id"],
            name=op.f("fk_runs_parent_run_id_runs"),
            ondelete="SET NULL",
        ),
        sa.CheckConstraint(
            "action IN ('dry_run', 'execute', 'rollback', 'health_check')",
            name=op.f("ck_runs_run_action"),
        ),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'halted')",
            name=op.f("ck_runs_run_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_runs_distribution_id"), ["distribution_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_runs_parent_run_id"), ["parent_run_id"], unique=False)
        batch_op.create_index("ix_runs_state_heartbeat_at", ["state", "heartbeat_at"], unique=False)

    op.create_table(
        "target_results",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("target_id", sa.String(length=36), nullable=False),
        sa.Column("batch_index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("diff", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True),
        sa.Column("error_reason", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("resource_version", sa.String(length=64), nullable=True),
        sa.Column("secret_name", sa.String(length=253), nullable=True),
        sa.Column("namespace", sa.String(length=63), nullable=True),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_target_results_attempts_not_negative")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_target_results_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["target_id"], ["targets.id"], name=op.f("fk_target_results_target_id_targets")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'created', 'updated', 'unchanged', 'failed',"
            " 'skipped', 'rolled_back', 'would_create', 'would_update')",
            name=op.f("ck_target_results_result_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_target_results")),
        sa.UniqueConstraint("run_id", "target_id", name=op.f("uq_target_results_run_id_target_id")),
    )
    with op.batch_alter_table("target_results", schema=None) as batch_op:
        batch_op.create_index(
            "ix_target_results_run_id_batch_index", ["run_id", "batch_index"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_target_results_target_id"), ["target_id"], unique=False
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("target_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_target_results_target_id"))
        batch_op.drop_index("ix_target_results_run_id_batch_index")

    op.drop_table("target_results")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_state_heartbeat_at")
        batch_op.drop_index(batch_op.f("ix_runs_parent_run_id"))
        batch_op.drop_index(batch_op.f("ix_runs_distribution_id"))

    op.drop_table("runs")
    with op.batch_alter_table("rollback_snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollback_snapshots_target_id"))

    op.drop_table("rollback_snapshots")
    with op.batch_alter_table("target_group_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_target_group_members_target_id"))

    op.drop_table("target_group_members")
    with op.batch_alter_table("distributions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_distributions_target_id"))
        batch_op.drop_index(batch_op.f("ix_distributions_group_id"))

    op.drop_table("distributions")
    with op.batch_alter_table("targets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_targets_credential_id"))

    op.drop_table("targets")
    op.drop_table("target_groups")
    op.drop_table("credentials")
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_certificates_sha256_fingerprint"))

    op.drop_table("certificates")
