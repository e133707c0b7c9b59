"""Targets: where a Kubernetes distribution writes (one cluster and namespace)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
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
    "record_health",
    "target_group_names",
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
    healthy: bool,
    message: str,
    checked_at: datetime | None = None,
) -> Target:
    """Store the outcome of a target health check."""
    target = get_target(session, target_id)
    target.health_status = HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY
    target.health_message = message
    target.health_checked_at = checked_at or utcnow()
    session.flush()
    return target
