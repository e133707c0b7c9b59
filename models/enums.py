"""Closed vocabularies stored in the database (each backed by a CHECK constraint)."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConnectionMode",
    "CredentialKind",
    "DistributionKind",
    "HealthStatus",
    "ResultStatus",
    "RunAction",
    "RunState",
]


class CredentialKind(StrEnum):
    """What a module credential holds."""

    KUBECONFIG = "kubeconfig"
    WEBHOOK_HMAC = "webhook_hmac"
    PKCS12_PASSWORD = "pkcs12_password"  # noqa: S105 - a kind name (revision 0006)


class ConnectionMode(StrEnum):
    """How a Kubernetes target authenticates."""

    IN_CLUSTER = "in_cluster"
    KUBECONFIG = "kubeconfig"


class HealthStatus(StrEnum):
    """Outcome of the last target health check."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class DistributionKind(StrEnum):
    """What a distribution does with its certificate."""

    KUBERNETES = "kubernetes"
    WEBHOOK = "webhook"


class RunAction(StrEnum):
    """What a run does."""

    DRY_RUN = "dry_run"
    EXECUTE = "execute"
    ROLLBACK = "rollback"
    AUDIT = "audit"
    """Read-only: one GET per target, classified against the pinned revision (revision 0007)."""
    # Never created by this worker (health checks are not runs). Kept because the stored
    # schema's run_action CHECK lists it, and the models must match the schema.
    HEALTH_CHECK = "health_check"


class RunState(StrEnum):
    """Life cycle of a run: queued -> running -> succeeded | failed | halted."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HALTED = "halted"

    @property
    def is_terminal(self) -> bool:
        """True for succeeded, failed and halted (the run will not change again)."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.HALTED)


class ResultStatus(StrEnum):
    """Per-target outcome within a run."""

    PENDING = "pending"
    RUNNING = "running"
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    FAILED = "failed"
    SKIPPED = "skipped"
    ROLLED_BACK = "rolled_back"
    WOULD_CREATE = "would_create"
    WOULD_UPDATE = "would_update"
    # What an audit found (revision 0007; worker.core.audit): the Secret was read.
    CURRENT = "current"
    OUTDATED = "outdated"
    DRIFTED = "drifted"
    UNMANAGED = "unmanaged"
    MISSING = "missing"

    @property
    def is_final(self) -> bool:
        """True once the target's work in the run is over (neither pending nor running)."""
        return self not in (ResultStatus.PENDING, ResultStatus.RUNNING)
