"""Targets: where a Kubernetes distribution writes (one cluster and namespace)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.entities import Target, TargetGroup, TargetGroupMember
from models.enums import ConnectionMode, CredentialKind, HealthStatus
from models.errors import InvalidRecordError
from models.queries._common import ensure_unique_name, get_row, get_row_by_name
from models.queries.credentials import get_credential

__all__ = [
    "create_target",
    "get_target",
    "get_target_by_name",
    "list_targets",
    "pin_cluster_identity",
    "pools_in_use",
    "record_health",
    "target_group_names",
    "target_pools",
]


def create_target(
    session: Session,
    *,
    name: str,
    connection_mode: ConnectionMode | str,
    namespace_template: str,
    secret_name_template: str,
    credential_id: str | None = None,
    include_ca: bool = False,
    allow_insecure: bool = False,
    adopt_unmanaged: bool = False,
    allow_system_namespace: bool = False,
    variables: Mapping[str, Any] | None = None,
    pool: str = "default",
    combined_pem: bool = False,
    pkcs12_credential_id: str | None = None,
    serving_endpoints: Sequence[str] = (),
    serving_deadline_seconds: int | None = None,
    serving_ca: str | None = None,
    serving_public_only: bool = False,
) -> Target:
    """Insert a Kubernetes target (templates are validated by the caller, worker.core.names)."""
    ensure_unique_name(session, Target, name, "target")
    mode = ConnectionMode(connection_mode)
    if mode is ConnectionMode.KUBECONFIG:
        if credential_id is None:
            raise InvalidRecordError(
                f"target {name!r}: connection mode 'kubeconfig' needs a credential holding the "
                "kubeconfig; pick one (or use connection mode 'in_cluster')"
            )
        credential = get_credential(session, credential_id)
        if credential.kind is not CredentialKind.KUBECONFIG:
            raise InvalidRecordError(
                f"target {name!r}: credential {credential.name!r} holds a {credential.kind.value}"
                ", not a kubeconfig; pick a kubeconfig credential"
            )
    elif credential_id is not None:
        raise InvalidRecordError(
            f"target {name!r}: connection mode 'in_cluster' uses the mounted service-account "
            "token and takes no credential; drop the credential or use mode 'kubeconfig'"
        )
    if pkcs12_credential_id is not None:
        password = get_credential(session, pkcs12_credential_id)
        if password.kind is not CredentialKind.PKCS12_PASSWORD:
            raise InvalidRecordError(
                f"target {name!r}: credential {password.name!r} holds a {password.kind.value}, "
                "not a PKCS#12 password; store one with `certautopilot credentials "
                "add-pkcs12-password NAME` and pass that name"
            )
    if not namespace_template.strip():
        raise InvalidRecordError(f"target {name!r}: the namespace must not be empty")
    if not secret_name_template.strip():
        raise InvalidRecordError(f"target {name!r}: the Secret name template must not be empty")
    target = Target(
        name=name,
        connection_mode=mode,
        credential_id=credential_id,
        namespace_template=namespace_template,
        secret_name_template=secret_name_template,
        include_ca=include_ca,
        allow_insecure=allow_insecure,
        adopt_unmanaged=adopt_unmanaged,
        allow_system_namespace=allow_system_namespace,
        variables=dict(variables or {}),
        pool=pool,
        combined_pem=combined_pem,
        pkcs12_credential_id=pkcs12_credential_id,
        serving_endpoints=list(serving_endpoints),
        serving_deadline_seconds=serving_deadline_seconds,
        serving_ca=serving_ca,
        serving_public_only=serving_public_only,
    )
    session.add(target)
    session.flush()
    return target


def get_target(session: Session, target_id: str) -> Target:
    """The target with this id, or NotFoundError."""
    return get_row(session, Target, target_id, "target")


def get_target_by_name(session: Session, name: str) -> Target:
    """The target with this name, or NotFoundError."""
    return get_row_by_name(session, Target, name, "target")


def list_targets(session: Session) -> list[Target]:
    """All targets by name."""
    return list(session.scalars(select(Target).order_by(Target.name)))


def target_group_names(session: Session, target_id: str) -> list[str]:
    """Names of the groups the target belongs to, sorted."""
    query = (
        select(TargetGroup.name)
        .join(TargetGroupMember, TargetGroupMember.group_id == TargetGroup.id)
        .where(TargetGroupMember.target_id == target_id)
        .order_by(TargetGroup.name)
    )
    return list(session.scalars(query))


def record_health(
    session: Session,
    target_id: str,
    *,
    healthy: bool | None,
    message: str,
    checked_at: datetime | None = None,
) -> Target:
    """Store the outcome of a target health check (``healthy=None``: it could not be judged,
    which is stored as unknown with the reason)."""
    target = get_target(session, target_id)
    if healthy is None:
        target.health_status = HealthStatus.UNKNOWN
    else:
        target.health_status = HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY
    target.health_message = message
    target.health_checked_at = checked_at or utcnow()
    session.flush()
    return target


def pools_in_use(session: Session) -> list[str]:
    """Every pool some target names, sorted (one statement)."""
    return sorted(session.scalars(select(Target.pool).distinct()))


def target_pools(session: Session, target_ids: Sequence[str]) -> dict[str, str]:
    """The pool of each of ``target_ids`` that exists (one statement)."""
    if not target_ids:
        return {}
    query = select(Target.id, Target.pool).where(Target.id.in_(list(dict.fromkeys(target_ids))))
    return {target_id: pool for target_id, pool in session.execute(query)}


def pin_cluster_identity(
    session: Session, target_id: str, identity: str, *, replace: bool = False
) -> str | None:
    """Record the cluster an in-cluster target writes to; the identity recorded afterwards.

    Without ``replace`` the identity is written only where none is recorded yet (a conditional
    update, so of two workers racing the first one wins and the other reads its value back).
    """
    statement = update(Target).where(Target.id == target_id).values(cluster_identity=identity)
    if not replace:
        statement = statement.where(Target.cluster_identity.is_(None))
    session.execute(statement.execution_options(synchronize_session=False))
    recorded: str | None = session.scalar(
        select(Target.cluster_identity).where(Target.id == target_id)
    )
    return recorded
