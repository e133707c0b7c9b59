"""The tables: certificates, credentials, targets, groups, distributions, runs, results, snapshots.

Conventions: UUID4 string primary keys generated client-side; timezone-aware UTC timestamps;
secrets only as sealed envelopes (see models.sealing) in ``bytes`` columns, never in reprs;
relationships ``lazy="raise"`` so nothing is loaded behind the caller's back (load what you
need with ``selectinload``/``joinedload`` or a query function from :mod:`models.queries`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, column_property, mapped_column, relationship

from models.base import Base, JsonValue, id_column, json_array_length, utcnow
from models.enums import (
    ConnectionMode,
    CredentialKind,
    DistributionKind,
    HealthStatus,
    ResultStatus,
    RunAction,
    RunState,
)

__all__ = [
    "Certificate",
    "CertificateRevision",
    "Credential",
    "Distribution",
    "RollbackSnapshot",
    "Run",
    "Target",
    "TargetGroup",
    "TargetGroupMember",
    "TargetResult",
    "WorkerHeartbeat",
]


# Names users type (targets, groups, credentials) may become Kubernetes-ish identifiers.
_NAME_LENGTH = 253


#: The runs the one-active-mutation index covers (revision 0002).
ACTIVE_MUTATION = (
    "state IN ('queued', 'running') AND action IN ('execute', 'rollback') AND parent_run_id IS NULL"
)
#: A result row still to be done (pending or running): the rows the pipeline's own scans look
#: for, a vanishing fraction of a large run once its batch is nearly through.
OPEN_RESULT = "status IN ('pending', 'running')"


def _enum(enum_class: type[StrEnum], name: str) -> Enum:
    # VARCHAR + CHECK instead of a native ENUM type: identical on SQLite and PostgreSQL, and
    # adding a value is a constraint change rather than an ALTER TYPE.
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class _ReprMixin:
    """Reprs that show identifying fields only, so secrets can never leak through them."""

    _repr_fields: tuple[str, ...] = ("id",)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name, None)!r}" for name in self._repr_fields)
        return f"{type(self).__name__}({shown})"


class Certificate(_ReprMixin, Base):
    """A TLS certificate with its chain; the private key is stored sealed."""

    __tablename__ = "certificates"
    _repr_fields = ("id", "common_name", "serial_hex", "not_after")

    id: Mapped[str] = id_column()
    common_name: Mapped[str | None] = mapped_column(String(255))
    """Subject CN; None for SAN-only certificates."""
    sans: Mapped[list[Any]] = mapped_column(default=list)
    serial_hex: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(Text)
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    sha256_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    leaf_pem: Mapped[str] = mapped_column(Text)
    chain_pem: Mapped[str] = mapped_column(Text, default="")
    ca_pem: Mapped[str | None] = mapped_column(Text)
    private_key: Mapped[bytes] = mapped_column()
    """Sealed envelope (purpose "private_key") of the PEM private key."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CertificateRevision(_ReprMixin, Base):
    """One version of a certificate (leaf, chain, CA and key), never changed once written.

    Import writes revision 1 and each renewal the next one; a run pins the revision that was
    current when it was enqueued (revision 0004), so a renewal during a progressive run
    cannot deploy a second, never-canaried certificate to its later batches. The key envelope
    is a copy of the certificate's at that time: it is sealed for the certificate (table
    "certificates", the certificate's id), so key rotation re-wraps it with that context.
    """

    __tablename__ = "certificate_revisions"
    __table_args__ = (UniqueConstraint("certificate_id", "number"),)
    _repr_fields = ("id", "certificate_id", "number", "serial_hex")

    id: Mapped[str] = id_column()
    certificate_id: Mapped[str] = mapped_column(
        ForeignKey("certificates.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    """1 for the imported certificate, then one more per renewal."""
    common_name: Mapped[str | None] = mapped_column(String(255))
    sans: Mapped[list[Any]] = mapped_column(default=list)
    serial_hex: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(Text)
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    sha256_fingerprint: Mapped[str] = mapped_column(String(64))
    leaf_pem: Mapped[str] = mapped_column(Text)
    chain_pem: Mapped[str] = mapped_column(Text, default="")
    ca_pem: Mapped[str | None] = mapped_column(Text)
    private_key: Mapped[bytes] = mapped_column()
    """The certificate's sealed key envelope as it was for this revision."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Credential(_ReprMixin, Base):
    """A module credential: kubeconfig bytes, a webhook HMAC key or a PKCS#12 password, sealed."""

    __tablename__ = "credentials"
    _repr_fields = ("id", "name", "kind")

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(String(_NAME_LENGTH), unique=True)
    kind: Mapped[CredentialKind] = mapped_column(_enum(CredentialKind, "credential_kind"))
    secret: Mapped[bytes] = mapped_column()
    """Sealed envelope (purpose "secret"); read it only through reveal_credential()."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Target(_ReprMixin, Base):
    """Where a Kubernetes distribution writes: one cluster and namespace."""

    __tablename__ = "targets"
    __table_args__ = (
        CheckConstraint(
            "(connection_mode = 'kubeconfig' AND credential_id IS NOT NULL)"
            " OR (connection_mode = 'in_cluster' AND credential_id IS NULL)",
            name="credential_iff_kubeconfig",
        ),
        CheckConstraint("module IN ('kubernetes')", name="target_module"),
    )
    _repr_fields = ("id", "name", "connection_mode", "namespace_template")

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(String(_NAME_LENGTH), unique=True)
    module: Mapped[str] = mapped_column(String(32), default="kubernetes")
    """Always "kubernetes" (this worker implements one module); the column and its CHECK
    stay as the scheduler's schema has them."""
    connection_mode: Mapped[ConnectionMode] = mapped_column(
        _enum(ConnectionMode, "connection_mode")
    )
    credential_id: Mapped[str | None] = mapped_column(ForeignKey("credentials.id"), index=True)
    namespace_template: Mapped[str] = mapped_column(Text)
    secret_name_template: Mapped[str] = mapped_column(Text)
    """Jinja/Go-style template; the application's default is worker.core.names'."""
    include_ca: Mapped[bool] = mapped_column(default=False, server_default=false())
    allow_insecure: Mapped[bool] = mapped_column(default=False, server_default=false())
    adopt_unmanaged: Mapped[bool] = mapped_column(default=False, server_default=false())
    allow_system_namespace: Mapped[bool] = mapped_column(default=False, server_default=false())
    """The namespace may be kube-system, kube-public or kube-node-lease (revision 0003)."""
    pool: Mapped[str] = mapped_column(String(63), default="default", server_default="default")
    """The worker pool that must process this target: its per-target work goes to that pool's
    queue only (revision 0005)."""
    cluster_identity: Mapped[str | None] = mapped_column(String(80))
    """In-cluster targets: the identity of the cluster they write to ("ca-sha256:<hex>" of the
    service-account CA), recorded by the first health check or run in their pool; a worker
    that sees another cluster refuses to write (revision 0005)."""
    combined_pem: Mapped[bool] = mapped_column(default=False, server_default=false())
    """Also write ``tls-combined.pem`` (key + leaf + chain) into the Secret (revision 0006)."""
    pkcs12_credential_id: Mapped[str | None] = mapped_column(
        ForeignKey("credentials.id"), index=True
    )
    """A ``pkcs12_password`` credential: also write ``keystore.p12`` encrypted with it
    (revision 0006); None writes no keystore."""
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    serving_endpoints: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    """Endpoints whose TLS handshake must present the new leaf after an execute, in their
    canonical text ``host:port[,sni=NAME]`` (worker.core.serving); empty: no verification
    (revision 0008)."""
    serving_deadline_seconds: Mapped[int | None] = mapped_column(Integer)
    """How long verification may take per endpoint; None = the default (120 s)."""
    serving_ca: Mapped[str | None] = mapped_column(Text)
    """Trust anchors for the served chain: a PEM bundle, or "own-chain" (the certificate's own
    chain and CA); None: only the leaf's fingerprint is compared."""
    serving_public_only: Mapped[bool] = mapped_column(default=False, server_default=false())
    """Refuse endpoints that are (or resolve to) loopback, private or link-local addresses."""
    health_status: Mapped[HealthStatus] = mapped_column(
        _enum(HealthStatus, "health_status"), default=HealthStatus.UNKNOWN
    )
    health_checked_at: Mapped[datetime | None]
    health_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    credential: Mapped[Credential | None] = relationship(lazy="raise", foreign_keys=[credential_id])
    pkcs12_credential: Mapped[Credential | None] = relationship(
        lazy="raise", foreign_keys=[pkcs12_credential_id]
    )


class TargetGroup(_ReprMixin, Base):
    """An ordered set of targets that one distribution fans out to."""

    __tablename__ = "target_groups"
    _repr_fields = ("id", "name", "batch_size", "failure_threshold")

    id: Mapped[str] = id_column()
    name: Mapped[str] = mapped_column(String(_NAME_LENGTH), unique=True)
    batch_size: Mapped[Any | None] = mapped_column(JsonValue)
    """int, "25%" or a progressive list like [1, 5, "20%"]; None = CAP_DEFAULT_BATCH_SIZE."""
    failure_threshold: Mapped[Any | None] = mapped_column(JsonValue)
    """int or "10%"; None = CAP_DEFAULT_FAILURE_THRESHOLD."""
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    require_serving: Mapped[bool] = mapped_column(default=False, server_default=false())
    """A target whose endpoints do not serve the new certificate by its deadline counts as
    failed (reason ``not_serving``) for the failure threshold (revision 0008)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    members: Mapped[list[TargetGroupMember]] = relationship(
        lazy="raise",
        order_by="TargetGroupMember.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class TargetGroupMember(Base):
    """Membership of a target in a group, with its position (fan-out order)."""

    __tablename__ = "target_group_members"
    __table_args__ = (
        UniqueConstraint("group_id", "position"),
        CheckConstraint("position >= 0", name="position_not_negative"),
    )

    group_id: Mapped[str] = mapped_column(
        ForeignKey("target_groups.id", ondelete="CASCADE"), primary_key=True
    )
    target_id: Mapped[str] = mapped_column(
        ForeignKey("targets.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(Integer)

    target: Mapped[Target] = relationship(lazy="raise")

    def __repr__(self) -> str:
        return (
            f"TargetGroupMember(group_id={self.group_id!r}, target_id={self.target_id!r}, "
            f"position={self.position!r})"
        )


class Distribution(_ReprMixin, Base):
    """A certificate attached to a target or group (Kubernetes) or to a webhook."""

    __tablename__ = "distributions"
    __table_args__ = (
        UniqueConstraint("certificate_id", "position"),
        # Kubernetes: exactly one of target/group, no webhook fields. Webhook: a URL only.
        CheckConstraint(
            "(kind = 'kubernetes'"
            " AND ((target_id IS NOT NULL AND group_id IS NULL)"
            " OR (target_id IS NULL AND group_id IS NOT NULL))"
            " AND webhook_url IS NULL AND webhook_credential_id IS NULL)"
            " OR (kind = 'webhook' AND target_id IS NULL AND group_id IS NULL"
            " AND webhook_url IS NOT NULL)",
            name="destination_matches_kind",
        ),
        CheckConstraint("position >= 0", name="position_not_negative"),
    )
    _repr_fields = ("id", "certificate_id", "kind", "target_id", "group_id", "position")

    id: Mapped[str] = id_column()
    certificate_id: Mapped[str] = mapped_column(ForeignKey("certificates.id"))
    kind: Mapped[DistributionKind] = mapped_column(
        _enum(DistributionKind, "distribution_kind"), default=DistributionKind.KUBERNETES
    )
    target_id: Mapped[str | None] = mapped_column(ForeignKey("targets.id"), index=True)
    group_id: Mapped[str | None] = mapped_column(ForeignKey("target_groups.id"), index=True)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_credential_id: Mapped[str | None] = mapped_column(ForeignKey("credentials.id"))
    store_content: Mapped[bool] = mapped_column(default=False, server_default=false())
    """The spec's "Store content for rollback": capture the previous Secret before writing."""
    position: Mapped[int] = mapped_column(Integer)
    """Order among the certificate's distributions (stacked distributions run after)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    certificate: Mapped[Certificate] = relationship(lazy="raise")
    target: Mapped[Target | None] = relationship(lazy="raise")
    group: Mapped[TargetGroup | None] = relationship(lazy="raise")
    webhook_credential: Mapped[Credential | None] = relationship(lazy="raise")


class Run(_ReprMixin, Base):
    """One execution of a distribution: dry-run, execute or rollback."""

    __tablename__ = "runs"
    __table_args__ = (
        # The reaper looks for running runs whose heartbeat is old.
        Index("ix_runs_state_heartbeat_at", "state", "heartbeat_at"),
        # `runs list` (newest first, also per distribution) reads a page, not the whole table.
        Index("ix_runs_created_at", "created_at"),
        Index("ix_runs_distribution_id_created_at", "distribution_id", "created_at"),
        # At most one mutating run (execute or rollback) per distribution is queued or running,
        # enforced by the database so that two schedulers or workers cannot both get one.
        # Stacked runs (queued by their parent's success) are sequenced by that parent.
        Index(
            "uq_runs_one_active_mutation",
            "distribution_id",
            unique=True,
            postgresql_where=text(ACTIVE_MUTATION),
            sqlite_where=text(ACTIVE_MUTATION),
        ),
    )
    _repr_fields = ("id", "distribution_id", "action", "state", "current_batch")

    id: Mapped[str] = id_column()
    distribution_id: Mapped[str] = mapped_column(
        ForeignKey("distributions.id", ondelete="CASCADE"), index=True
    )
    action: Mapped[RunAction] = mapped_column(_enum(RunAction, "run_action"))
    state: Mapped[RunState] = mapped_column(_enum(RunState, "run_state"), default=RunState.QUEUED)
    reason: Mapped[str | None] = mapped_column(Text)
    current_batch: Mapped[int] = mapped_column(Integer, default=0)
    batch_plan: Mapped[list[Any]] = mapped_column(default=list, deferred=True)
    """Target ids per batch, e.g. [["t1"], ["t2", "t3"]]. Deferred: ~40 bytes a target, read
    only when a batch is dispatched (loading it with every run made polling a 10,000-target
    run cost the database a 400 KB document per look)."""
    batch_count: Mapped[int] = column_property(
        # In the class body batch_plan is still the MappedColumn; its .column is the Column.
        json_array_length(batch_plan.column),  # type: ignore[attr-defined]
        deferred=True,
    )
    """How many batches the plan has, counted by the database (deferred too: counting
    still reads the plan; the reports ask for it, the pipeline does not)."""
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Run options such as {"force": true}."""
    cascade: Mapped[bool] = mapped_column(default=False, server_default=false())
    """Start the next stacked distribution of the certificate when this run succeeds."""
    parent_run_id: Mapped[str | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    """Last progress; a running run silent for CAP_STALE_AFTER seconds is stalled."""
    certificate_revision_id: Mapped[str | None] = mapped_column(
        ForeignKey("certificate_revisions.id"), index=True
    )
    """The certificate revision this run deploys, pinned when it was enqueued (set for every
    run; NULL only in a database written before revision 0004 and never upgraded)."""

    distribution: Mapped[Distribution] = relationship(lazy="raise")
    results: Mapped[list[TargetResult]] = relationship(
        lazy="raise",
        back_populates="run",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="(TargetResult.batch_index, TargetResult.target_id)",
    )


class TargetResult(_ReprMixin, Base):
    """The outcome of one run for one target."""

    __tablename__ = "target_results"
    __table_args__ = (
        UniqueConstraint("run_id", "target_id"),
        Index("ix_target_results_run_id_batch_index", "run_id", "batch_index"),
        # Every message asks "has my batch an open row left?" and the reaper looks for lost
        # rows: over the open rows only, that stays a few index entries when a 10,000-target
        # batch is nearly through, instead of a walk over every finished row of the batch.
        Index(
            "ix_target_results_open",
            "run_id",
            "batch_index",
            postgresql_where=text(OPEN_RESULT),
            sqlite_where=text(OPEN_RESULT),
        ),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    )
    _repr_fields = ("id", "run_id", "target_id", "batch_index", "status", "error_reason")

    id: Mapped[str] = id_column()
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    target_id: Mapped[str] = mapped_column(ForeignKey("targets.id"), index=True)
    batch_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[ResultStatus] = mapped_column(
        _enum(ResultStatus, "result_status"), default=ResultStatus.PENDING
    )
    diff: Mapped[dict[str, Any] | None] = mapped_column(JsonValue)
    """Diff summary (SecretDiff.to_dict()); never key material."""
    error_reason: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None]
    """When a message carrying this pending target was last sent (database clock): one that
    no delivery claimed for CAP_RESEND_AFTER seconds is lost and re-sent by the reaper."""
    lease_expires_at: Mapped[datetime | None]
    """While running: the claim holds until then (database clock); the delivering message
    extends it while it works, so only a claim whose worker died ever expires."""
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    resource_version: Mapped[str | None] = mapped_column(String(64))
    secret_name: Mapped[str | None] = mapped_column(String(253))
    namespace: Mapped[str | None] = mapped_column(String(63))
    deployed_serial: Mapped[str | None] = mapped_column(String(64))
    """Audit runs: serial (hex) of the first certificate of the live tls.crt (revision 0007)."""
    deployed_not_after: Mapped[datetime | None]
    """Audit runs: its not-after (revision 0007)."""
    finding: Mapped[dict[str, Any] | None] = mapped_column(JsonValue)
    """Audit runs: worker.core.audit.AuditFinding.to_dict() (revision 0007); no key material."""
    serving_status: Mapped[str | None] = mapped_column(String(32))
    """The target's serving verdict (worker.core.serving.ServingState) after an execute that
    verified serving; None when the target names no endpoint (revision 0008)."""
    serving: Mapped[list[Any] | None] = mapped_column(JsonValue)
    """Per endpoint: state, seconds, attempts, serial and not-after seen, reason, the line."""

    run: Mapped[Run] = relationship(lazy="raise", back_populates="results")
    target: Mapped[Target] = relationship(lazy="raise")


class RollbackSnapshot(_ReprMixin, Base):
    """The spec's LastRollbackMeta: the Secret as it was before our first write.

    Written only when the distribution has "Store content" on, at most once per
    (distribution, target), and never overwritten by our own content.
    """

    __tablename__ = "rollback_snapshots"
    __table_args__ = (
        UniqueConstraint("distribution_id", "target_id"),
        CheckConstraint(
            "(existed AND previous IS NOT NULL) OR (NOT existed AND previous IS NULL)",
            name="previous_iff_existed",
        ),
    )
    _repr_fields = ("id", "distribution_id", "target_id", "existed", "written_fingerprint")

    id: Mapped[str] = id_column()
    distribution_id: Mapped[str] = mapped_column(ForeignKey("distributions.id", ondelete="CASCADE"))
    target_id: Mapped[str] = mapped_column(ForeignKey("targets.id"), index=True)
    existed: Mapped[bool] = mapped_column(Boolean)
    previous: Mapped[bytes | None] = mapped_column()
    """Sealed JSON of the application's PreviousSecret.to_dict() (models.queries.snapshots);
    None if the Secret did not exist."""
    taken_at: Mapped[datetime] = mapped_column(default=utcnow)
    written_fingerprint: Mapped[str | None] = mapped_column(String(64))
    """SHA-256 fingerprint of the certificate we last wrote (drift detection)."""
    written_resource_version: Mapped[str | None] = mapped_column(String(64))
    written_at: Mapped[datetime | None]

    distribution: Mapped[Distribution] = relationship(lazy="raise")
    target: Mapped[Target] = relationship(lazy="raise")


class WorkerHeartbeat(_ReprMixin, Base):
    """A worker's last sign of life, per pool: written by each worker's housekeeper thread.

    ``runs show`` and the reaper read it to tell a pool with pending targets and no live worker
    (revision 0005).
    """

    __tablename__ = "worker_heartbeats"
    _repr_fields = ("worker", "pool", "seen_at")

    worker: Mapped[str] = mapped_column(String(255), primary_key=True)
    """The worker's Celery node name (``certautopilot@<pod>``)."""
    pool: Mapped[str] = mapped_column(String(63), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)
