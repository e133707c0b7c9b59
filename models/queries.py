"""Query and command functions over the models.

Every function takes the session and never commits: the caller owns the transaction
(``worker.db.session_scope``). Functions may flush so constraint violations surface at the
call that caused them. Secrets go in and out only through the ``store_*`` / ``reveal_*``
functions, which seal and unseal with :mod:`worker.core.crypto` bound to the row (table, id,
purpose), so a sealed value copied to another row does not decrypt.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.base import Base, new_id, utcnow
from models.entities import (
    DEFAULT_SECRET_NAME_TEMPLATE,
    Certificate,
    Credential,
    Distribution,
    RollbackSnapshot,
    Run,
    Target,
    TargetGroup,
    TargetGroupMember,
    TargetResult,
)
from models.enums import (
    ConnectionMode,
    CredentialKind,
    DistributionKind,
    HealthStatus,
    ResultStatus,
    RunAction,
    RunState,
)
from worker.core.crypto import (
    Keyring,
    SealContext,
    UnknownKeyError,
    envelope_key_id,
    rewrap,
    seal,
    unseal,
)
from worker.core.fanout import FanoutConfigError, parse_batch_size, parse_failure_threshold

__all__ = [
    "ENVELOPE_COLUMNS",
    "AlreadyExistsError",
    "BundleLike",
    "CertificateFacts",
    "InvalidRecordError",
    "NotFoundError",
    "RunStateError",
    "SnapshotContent",
    "count_results",
    "create_distribution",
    "create_group",
    "create_run",
    "create_target",
    "distribution_target_ids",
    "envelope_key_usage",
    "finish_run",
    "get_certificate",
    "get_credential",
    "get_credential_by_name",
    "get_distribution",
    "get_group",
    "get_group_by_name",
    "get_run",
    "get_snapshot",
    "get_target",
    "get_target_by_name",
    "get_target_result",
    "group_target_ids",
    "group_targets",
    "list_certificates",
    "list_credentials",
    "list_distributions",
    "list_groups",
    "list_runs",
    "list_target_results",
    "list_targets",
    "next_distribution",
    "record_health",
    "record_snapshot_write",
    "record_target_result",
    "replace_certificate",
    "replace_credential_secret",
    "reveal_credential",
    "reveal_private_key",
    "reveal_snapshot",
    "rotate_keys",
    "save_snapshot_if_absent",
    "set_group_members",
    "skip_pending_results",
    "stale_runs",
    "start_run",
    "store_certificate",
    "store_credential",
    "touch_run",
]


class NotFoundError(LookupError):
    """No row with the given id or name."""

    def __init__(self, entity: str, key: str, *, by: str = "id") -> None:
        super().__init__(f"{entity} with {by} {key!r} not found")
        self.entity = entity
        self.key = key


class AlreadyExistsError(ValueError):
    """A row with the same unique name already exists."""


class InvalidRecordError(ValueError):
    """The values given do not form a valid row (the message says which rule and how to fix)."""


class RunStateError(ValueError):
    """A run transition that its current state does not allow."""


# ------------------------------------------------------------------------------- envelopes

ENVELOPE_COLUMNS: tuple[tuple[type[Base], str], ...] = (
    (Certificate, "private_key"),
    (Credential, "secret"),
    (RollbackSnapshot, "previous"),
)
"""Every column holding a sealed envelope; key rotation walks exactly these."""


def _context(model: type[Base], row_id: str, column: str) -> SealContext:
    # The purpose is the column name: it distinguishes two envelopes of the same row.
    return SealContext(table=model.__tablename__, row_id=row_id, purpose=column)


# --------------------------------------------------------------------------------- helpers

_M = TypeVar("_M", bound=Base)


def _get(session: Session, model: type[_M], row_id: str, entity: str) -> _M:
    row = session.get(model, row_id)
    if row is None:
        raise NotFoundError(entity, row_id)
    return row


def _get_by_name(session: Session, model: type[_M], name: str, entity: str) -> _M:
    row = session.scalars(select(model).where(model.name == name)).one_or_none()  # type: ignore[attr-defined]
    if row is None:
        raise NotFoundError(entity, name, by="name")
    return row


def _ensure_unique_name(session: Session, model: type[Base], name: str, entity: str) -> None:
    if not name or not name.strip():
        raise InvalidRecordError(f"{entity} name must not be empty")
    taken = session.scalar(select(model.id).where(model.name == name))  # type: ignore[attr-defined]
    if taken is not None:
        raise AlreadyExistsError(
            f"a {entity} named {name!r} already exists (id {taken}); choose another name"
        )


# ------------------------------------------------------------------------------ certificates


class CertificateFacts(Protocol):
    """The parsed leaf fields stored with a certificate (worker.bundle.CertificateInfo)."""

    @property
    def common_name(self) -> str | None: ...
    @property
    def sans(self) -> Sequence[str]: ...
    @property
    def serial_hex(self) -> str: ...
    @property
    def issuer(self) -> str: ...
    @property
    def not_before(self) -> datetime: ...
    @property
    def not_after(self) -> datetime: ...
    @property
    def sha256_fingerprint(self) -> str: ...


class BundleLike(Protocol):
    """A validated bundle (worker.bundle.TlsBundle): leaf facts, PEMs and the private key."""

    @property
    def leaf(self) -> CertificateFacts: ...
    @property
    def leaf_pem(self) -> bytes: ...
    @property
    def chain_pems(self) -> Sequence[bytes]: ...
    @property
    def key_pem(self) -> bytes: ...
    @property
    def ca_pem(self) -> bytes | None: ...


def _apply_bundle(certificate: Certificate, keyring: Keyring, bundle: BundleLike) -> None:
    leaf = bundle.leaf
    certificate.common_name = leaf.common_name
    certificate.sans = list(leaf.sans)
    certificate.serial_hex = leaf.serial_hex
    certificate.issuer = leaf.issuer
    certificate.not_before = leaf.not_before
    certificate.not_after = leaf.not_after
    certificate.sha256_fingerprint = leaf.sha256_fingerprint
    certificate.leaf_pem = bundle.leaf_pem.decode("ascii")
    certificate.chain_pem = b"".join(bundle.chain_pems).decode("ascii")
    certificate.ca_pem = bundle.ca_pem.decode("ascii") if bundle.ca_pem is not None else None
    certificate.private_key = seal(
        keyring, bundle.key_pem, _context(Certificate, certificate.id, "private_key")
    )


def store_certificate(
    session: Session, keyring: Keyring, bundle: BundleLike, *, certificate_id: str | None = None
) -> Certificate:
    """Insert a certificate from a validated bundle; the private key is sealed."""
    certificate = Certificate(id=certificate_id or new_id())
    _apply_bundle(certificate, keyring, bundle)
    session.add(certificate)
    session.flush()
    return certificate


def replace_certificate(
    session: Session, keyring: Keyring, certificate_id: str, bundle: BundleLike
) -> Certificate:
    """Replace a certificate's content with a renewed bundle, keeping its id (renewal)."""
    certificate = get_certificate(session, certificate_id)
    _apply_bundle(certificate, keyring, bundle)
    session.flush()
    return certificate


def get_certificate(session: Session, certificate_id: str) -> Certificate:
    """The certificate with this id, or NotFoundError."""
    return _get(session, Certificate, certificate_id, "certificate")


def list_certificates(session: Session) -> list[Certificate]:
    """All certificates, oldest first."""
    return list(session.scalars(select(Certificate).order_by(Certificate.created_at)))


def reveal_private_key(session: Session, keyring: Keyring, certificate_id: str) -> bytes:
    """The certificate's private key PEM, decrypted (only for building the Secret)."""
    certificate = get_certificate(session, certificate_id)
    return unseal(
        keyring, certificate.private_key, _context(Certificate, certificate.id, "private_key")
    )


# ------------------------------------------------------------------------------- credentials


def store_credential(
    session: Session,
    keyring: Keyring,
    name: str,
    kind: CredentialKind | str,
    secret_bytes: bytes,
) -> Credential:
    """Insert a module credential; ``secret_bytes`` (e.g. a kubeconfig) are sealed."""
    _ensure_unique_name(session, Credential, name, "credential")
    if not secret_bytes:
        raise InvalidRecordError(f"credential {name!r}: the secret is empty; paste the kubeconfig")
    row_id = new_id()
    credential = Credential(
        id=row_id,
        name=name,
        kind=CredentialKind(kind),
        secret=seal(keyring, secret_bytes, _context(Credential, row_id, "secret")),
    )
    session.add(credential)
    session.flush()
    return credential


def replace_credential_secret(
    session: Session, keyring: Keyring, credential_id: str, secret_bytes: bytes
) -> Credential:
    """Replace a credential's secret (e.g. a renewed kubeconfig), sealed under the current KEK."""
    credential = get_credential(session, credential_id)
    if not secret_bytes:
        raise InvalidRecordError(f"credential {credential.name!r}: the new secret is empty")
    credential.secret = seal(keyring, secret_bytes, _context(Credential, credential.id, "secret"))
    session.flush()
    return credential


def get_credential(session: Session, credential_id: str) -> Credential:
    """The credential with this id, or NotFoundError."""
    return _get(session, Credential, credential_id, "credential")


def get_credential_by_name(session: Session, name: str) -> Credential:
    """The credential with this name, or NotFoundError."""
    return _get_by_name(session, Credential, name, "credential")


def list_credentials(session: Session) -> list[Credential]:
    """All credentials by name (secrets stay sealed)."""
    return list(session.scalars(select(Credential).order_by(Credential.name)))


def reveal_credential(session: Session, keyring: Keyring, credential_id: str) -> bytes:
    """The credential's secret bytes, decrypted (only for the connection code)."""
    credential = get_credential(session, credential_id)
    return unseal(keyring, credential.secret, _context(Credential, credential.id, "secret"))


# ----------------------------------------------------------------------------------- targets


def create_target(
    session: Session,
    *,
    name: str,
    connection_mode: ConnectionMode | str,
    namespace_template: str,
    credential_id: str | None = None,
    secret_name_template: str = DEFAULT_SECRET_NAME_TEMPLATE,
    include_ca: bool = False,
    allow_insecure: bool = False,
    adopt_unmanaged: bool = False,
    variables: Mapping[str, Any] | None = None,
) -> Target:
    """Insert a Kubernetes target (templates are validated by the caller, worker.core.names)."""
    _ensure_unique_name(session, Target, name, "target")
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
        variables=dict(variables or {}),
    )
    session.add(target)
    session.flush()
    return target


def get_target(session: Session, target_id: str) -> Target:
    """The target with this id, or NotFoundError."""
    return _get(session, Target, target_id, "target")


def get_target_by_name(session: Session, name: str) -> Target:
    """The target with this name, or NotFoundError."""
    return _get_by_name(session, Target, name, "target")


def list_targets(session: Session) -> list[Target]:
    """All targets by name."""
    return list(session.scalars(select(Target).order_by(Target.name)))


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


# ------------------------------------------------------------------------------------ groups


def _validate_fanout(name: str, batch_size: Any, failure_threshold: Any) -> None:
    try:
        if batch_size is not None:
            parse_batch_size(batch_size)
        if failure_threshold is not None:
            parse_failure_threshold(failure_threshold)
    except FanoutConfigError as exc:
        raise InvalidRecordError(f"group {name!r}: {exc}") from exc


def create_group(
    session: Session,
    *,
    name: str,
    target_ids: Sequence[str],
    batch_size: int | str | Sequence[int | str] | None = None,
    failure_threshold: int | str | None = None,
    variables: Mapping[str, Any] | None = None,
) -> TargetGroup:
    """Insert a group with its targets in fan-out order (None = settings defaults)."""
    _ensure_unique_name(session, TargetGroup, name, "group")
    _validate_fanout(name, batch_size, failure_threshold)
    stored_batch = (
        list(batch_size)
        if batch_size is not None and not isinstance(batch_size, int | str)
        else batch_size
    )
    group = TargetGroup(
        name=name,
        batch_size=stored_batch,
        failure_threshold=failure_threshold,
        variables=dict(variables or {}),
    )
    session.add(group)
    session.flush()
    set_group_members(session, group.id, target_ids)
    return group


def set_group_members(session: Session, group_id: str, target_ids: Sequence[str]) -> None:
    """Replace the group's members with ``target_ids``, in that order."""
    group = get_group(session, group_id)
    duplicates = sorted(tid for tid, n in Counter(target_ids).items() if n > 1)
    if duplicates:
        raise InvalidRecordError(
            f"group {group.name!r}: target(s) {', '.join(duplicates)} listed more than once"
        )
    for target_id in target_ids:
        get_target(session, target_id)
    session.execute(delete(TargetGroupMember).where(TargetGroupMember.group_id == group_id))
    # Flush the deletes first: re-inserted positions would otherwise collide with the
    # unique (group_id, position) constraint inside one flush.
    session.flush()
    for position, target_id in enumerate(target_ids):
        session.add(TargetGroupMember(group_id=group_id, target_id=target_id, position=position))
    session.flush()


def get_group(session: Session, group_id: str) -> TargetGroup:
    """The group with this id, or NotFoundError."""
    return _get(session, TargetGroup, group_id, "group")


def get_group_by_name(session: Session, name: str) -> TargetGroup:
    """The group with this name, or NotFoundError."""
    return _get_by_name(session, TargetGroup, name, "group")


def list_groups(session: Session) -> list[TargetGroup]:
    """All groups by name."""
    return list(session.scalars(select(TargetGroup).order_by(TargetGroup.name)))


def group_targets(session: Session, group_id: str) -> list[Target]:
    """The group's targets in fan-out order."""
    get_group(session, group_id)
    query = (
        select(Target)
        .join(TargetGroupMember, TargetGroupMember.target_id == Target.id)
        .where(TargetGroupMember.group_id == group_id)
        .order_by(TargetGroupMember.position)
    )
    return list(session.scalars(query))


# ----------------------------------------------------------------------------- distributions


def create_distribution(
    session: Session,
    *,
    certificate_id: str,
    target_id: str | None = None,
    group_id: str | None = None,
    store_content: bool = False,
    kind: DistributionKind | str = DistributionKind.KUBERNETES,
    webhook_url: str | None = None,
    webhook_credential_id: str | None = None,
    position: int | None = None,
) -> Distribution:
    """Attach a certificate to a target or group (or a webhook); appended unless ``position``."""
    get_certificate(session, certificate_id)
    distribution_kind = DistributionKind(kind)
    if distribution_kind is DistributionKind.KUBERNETES:
        if (target_id is None) == (group_id is None):
            raise InvalidRecordError(
                "a Kubernetes distribution goes to exactly one target or one group; "
                f"got target={target_id!r}, group={group_id!r}"
            )
        if webhook_url is not None or webhook_credential_id is not None:
            raise InvalidRecordError("a Kubernetes distribution takes no webhook URL/credential")
        if target_id is not None:
            get_target(session, target_id)
        if group_id is not None:
            get_group(session, group_id)
    else:
        if target_id is not None or group_id is not None or not webhook_url:
            raise InvalidRecordError(
                "a webhook distribution needs a webhook URL and no target or group"
            )
        if webhook_credential_id is not None:
            get_credential(session, webhook_credential_id)
    if position is None:
        highest = session.scalar(
            select(func.max(Distribution.position)).where(
                Distribution.certificate_id == certificate_id
            )
        )
        position = 0 if highest is None else highest + 1
    distribution = Distribution(
        certificate_id=certificate_id,
        kind=distribution_kind,
        target_id=target_id,
        group_id=group_id,
        webhook_url=webhook_url,
        webhook_credential_id=webhook_credential_id,
        store_content=store_content,
        position=position,
    )
    session.add(distribution)
    session.flush()
    return distribution


def get_distribution(session: Session, distribution_id: str) -> Distribution:
    """The distribution with this id, or NotFoundError."""
    return _get(session, Distribution, distribution_id, "distribution")


def list_distributions(session: Session, certificate_id: str | None = None) -> list[Distribution]:
    """Distributions (of one certificate, or all), in stacking order."""
    query = select(Distribution).order_by(Distribution.certificate_id, Distribution.position)
    if certificate_id is not None:
        query = query.where(Distribution.certificate_id == certificate_id)
    return list(session.scalars(query))


def next_distribution(session: Session, distribution: Distribution) -> Distribution | None:
    """The distribution stacked right after this one on the same certificate, if any."""
    query = (
        select(Distribution)
        .where(
            Distribution.certificate_id == distribution.certificate_id,
            Distribution.position > distribution.position,
        )
        .order_by(Distribution.position)
        .limit(1)
    )
    return session.scalars(query).first()


def group_target_ids(session: Session, group_id: str) -> list[str]:
    """The ids of the group's targets in fan-out order."""
    get_group(session, group_id)
    # Ids only: planning a large fleet must not build an ORM object per target (a process
    # keeps the memory high-water mark; bench/ saw +16 MB at 1000 targets).
    query = (
        select(TargetGroupMember.target_id)
        .where(TargetGroupMember.group_id == group_id)
        .order_by(TargetGroupMember.position)
    )
    return list(session.scalars(query))


def distribution_target_ids(session: Session, distribution: Distribution) -> list[str]:
    """The target ids a Kubernetes distribution writes to, in fan-out order."""
    if distribution.target_id is not None:
        return [distribution.target_id]
    if distribution.group_id is not None:
        return group_target_ids(session, distribution.group_id)
    return []


# -------------------------------------------------------------------------------------- runs

_ALLOWED_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.RUNNING, RunState.FAILED, RunState.HALTED}),
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.HALTED}),
}


def create_run(
    session: Session,
    *,
    distribution_id: str,
    action: RunAction | str,
    options: Mapping[str, Any] | None = None,
    cascade: bool = False,
    parent_run_id: str | None = None,
) -> Run:
    """Insert a queued run for a distribution."""
    get_distribution(session, distribution_id)
    run = Run(
        distribution_id=distribution_id,
        action=RunAction(action),
        state=RunState.QUEUED,
        options=dict(options or {}),
        cascade=cascade,
        parent_run_id=parent_run_id,
        batch_plan=[],
        current_batch=0,
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, run_id: str, *, lock: bool = False) -> Run:
    """The run with this id; ``lock`` takes a row lock (FOR UPDATE) on PostgreSQL."""
    query = select(Run).where(Run.id == run_id)
    if lock:
        # SQLite ignores FOR UPDATE; there BEGIN IMMEDIATE already serialises writers.
        query = query.with_for_update().execution_options(populate_existing=True)
    run = session.scalars(query).one_or_none()
    if run is None:
        raise NotFoundError("run", run_id)
    return run


def list_runs(
    session: Session, *, distribution_id: str | None = None, limit: int = 50
) -> list[Run]:
    """Most recent runs first (of one distribution, or all)."""
    query = select(Run).order_by(Run.created_at.desc(), Run.id).limit(limit)
    if distribution_id is not None:
        query = query.where(Run.distribution_id == distribution_id)
    return list(session.scalars(query))


def _transition(run: Run, to: RunState) -> None:
    if to not in _ALLOWED_TRANSITIONS.get(run.state, frozenset()):
        raise RunStateError(f"run {run.id} is {run.state.value}; it cannot become {to.value}")
    run.state = to


def start_run(
    session: Session, run_id: str, *, batch_plan: Sequence[Sequence[str]], now: datetime
) -> Run:
    """Mark a queued run running with its batch plan and create its pending target results."""
    run = get_run(session, run_id, lock=True)
    _transition(run, RunState.RUNNING)
    plan = [list(batch) for batch in batch_plan]
    run.batch_plan = plan
    run.current_batch = 0
    run.started_at = now
    run.heartbeat_at = now
    rows = [
        {"run_id": run.id, "target_id": target_id, "batch_index": batch_index}
        for batch_index, batch in enumerate(plan)
        for target_id in batch
    ]
    session.flush()
    if rows:
        # One multi-row INSERT through Core, without an ORM object per result (see
        # distribution_target_ids); column defaults (id, status, attempts) still apply.
        session.execute(insert(cast(Table, TargetResult.__table__)), rows)
    return run


def touch_run(
    session: Session, run_id: str, *, now: datetime, current_batch: int | None = None
) -> Run:
    """Record progress (heartbeat) on a run, optionally moving it to another batch."""
    run = get_run(session, run_id)
    run.heartbeat_at = now
    if current_batch is not None:
        run.current_batch = current_batch
    session.flush()
    return run


def finish_run(
    session: Session, run_id: str, state: RunState | str, *, now: datetime, reason: str | None
) -> Run:
    """Move a run to a terminal state (succeeded, failed, halted) with its reason."""
    run = get_run(session, run_id, lock=True)
    target_state = RunState(state)
    if not target_state.is_terminal:
        raise RunStateError(f"finish_run needs a terminal state, not {target_state.value}")
    _transition(run, target_state)
    run.reason = reason
    run.finished_at = now
    run.heartbeat_at = now
    session.flush()
    return run


def stale_runs(session: Session, *, heartbeat_before: datetime) -> list[Run]:
    """Running runs whose last progress is older than ``heartbeat_before`` (for the reaper)."""
    query = (
        select(Run)
        .where(Run.state == RunState.RUNNING, Run.heartbeat_at < heartbeat_before)
        .order_by(Run.heartbeat_at)
    )
    return list(session.scalars(query))


# ---------------------------------------------------------------------------- target results


def get_target_result(session: Session, run_id: str, target_id: str) -> TargetResult:
    """The result row of one target in one run, or NotFoundError."""
    query = select(TargetResult).where(
        TargetResult.run_id == run_id, TargetResult.target_id == target_id
    )
    result = session.scalars(query).one_or_none()
    if result is None:
        raise NotFoundError("target result", f"{run_id}/{target_id}", by="run/target")
    return result


def list_target_results(
    session: Session, run_id: str, *, batch_index: int | None = None
) -> list[TargetResult]:
    """A run's target results in batch order."""
    query = (
        select(TargetResult)
        .where(TargetResult.run_id == run_id)
        .order_by(TargetResult.batch_index, TargetResult.target_id)
    )
    if batch_index is not None:
        query = query.where(TargetResult.batch_index == batch_index)
    return list(session.scalars(query))


_UNSET: Any = object()


def record_target_result(
    session: Session,
    run_id: str,
    target_id: str,
    *,
    status: ResultStatus | str,
    diff: Mapping[str, Any] | None = _UNSET,
    error_reason: str | None = _UNSET,
    error_message: str | None = _UNSET,
    attempts: int | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    resource_version: str | None = _UNSET,
    secret_name: str | None = _UNSET,
    namespace: str | None = _UNSET,
) -> TargetResult:
    """Update a target's result row; fields not given keep their value."""
    result = get_target_result(session, run_id, target_id)
    result.status = ResultStatus(status)
    if diff is not _UNSET:
        result.diff = dict(diff) if diff is not None else None
    if error_reason is not _UNSET:
        result.error_reason = error_reason
    if error_message is not _UNSET:
        result.error_message = error_message
    if resource_version is not _UNSET:
        result.resource_version = resource_version
    if secret_name is not _UNSET:
        result.secret_name = secret_name
    if namespace is not _UNSET:
        result.namespace = namespace
    if attempts is not None:
        result.attempts = attempts
    if started_at is not None:
        result.started_at = started_at
    if finished_at is not None:
        result.finished_at = finished_at
        if result.started_at is not None:
            elapsed = finished_at - result.started_at
            result.duration_ms = max(0, round(elapsed.total_seconds() * 1000))
    session.flush()
    return result


def count_results(
    session: Session, run_id: str, *, batch_index: int | None = None
) -> Counter[ResultStatus]:
    """How many of a run's targets (optionally of one batch) are in each status."""
    query = (
        select(TargetResult.status, func.count())
        .where(TargetResult.run_id == run_id)
        .group_by(TargetResult.status)
    )
    if batch_index is not None:
        query = query.where(TargetResult.batch_index == batch_index)
    return Counter({ResultStatus(status): count for status, count in session.execute(query)})


def skip_pending_results(
    session: Session, run_id: str, *, from_batch: int, reason: str, now: datetime
) -> int:
    """Mark every still-pending target in batches >= ``from_batch`` skipped; returns the count."""
    statement = (
        update(TargetResult)
        .where(
            TargetResult.run_id == run_id,
            TargetResult.batch_index >= from_batch,
            TargetResult.status == ResultStatus.PENDING,
        )
        .values(status=ResultStatus.SKIPPED, error_message=reason, finished_at=now)
        .execution_options(synchronize_session="fetch")
    )
    return int(session.execute(statement).rowcount)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- rollback snapshots


@dataclass(frozen=True)
class SnapshotContent:
    """A decrypted rollback snapshot: the Secret as it was before our first write."""

    existed: bool
    type: str | None
    data: Mapping[str, str] = field(repr=False)
    """Secret data as in the API: key -> base64 string (private key material!)."""
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    resource_version: str | None
    taken_at: datetime
    written_fingerprint: str | None
    written_resource_version: str | None
    written_at: datetime | None


def save_snapshot_if_absent(
    session: Session,
    keyring: Keyring,
    *,
    distribution_id: str,
    target_id: str,
    existed: bool,
    secret_type: str | None = None,
    data: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    resource_version: str | None = None,
    taken_at: datetime | None = None,
) -> bool:
    """Store the previous Secret unless a snapshot exists already; True if this call stored it.

    Race-safe: the insert is ``ON CONFLICT DO NOTHING`` on the (distribution, target) unique
    key, so of two concurrent deliveries exactly one snapshot wins and the other is a no-op.
    ``data`` is the Secret's ``data`` as returned by the API (base64 strings).
    """
    row_id = new_id()
    previous: bytes | None = None
    if existed:
        payload = {
            "type": secret_type,
            "data": dict(data or {}),
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
            "resourceVersion": resource_version,
        }
        previous = seal(
            keyring,
            json.dumps(payload, sort_keys=True).encode("utf-8"),
            _context(RollbackSnapshot, row_id, "previous"),
        )
    values = {
        "id": row_id,
        "distribution_id": distribution_id,
        "target_id": target_id,
        "existed": existed,
        "previous": previous,
        "taken_at": taken_at or utcnow(),
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(RollbackSnapshot)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["distribution_id", "target_id"])
        # RETURNING tells reliably whether this statement inserted: rowcount of an ORM
        # insert is not dependable across drivers.
        .returning(RollbackSnapshot.id)
    )
    return session.execute(statement).scalar_one_or_none() is not None


def get_snapshot(session: Session, distribution_id: str, target_id: str) -> RollbackSnapshot | None:
    """The snapshot row for (distribution, target), or None (still sealed)."""
    query = select(RollbackSnapshot).where(
        RollbackSnapshot.distribution_id == distribution_id,
        RollbackSnapshot.target_id == target_id,
    )
    return session.scalars(query).one_or_none()


def reveal_snapshot(
    session: Session, keyring: Keyring, distribution_id: str, target_id: str
) -> SnapshotContent:
    """The decrypted snapshot for (distribution, target), or NotFoundError."""
    snapshot = get_snapshot(session, distribution_id, target_id)
    if snapshot is None:
        raise NotFoundError(
            "rollback snapshot", f"{distribution_id}/{target_id}", by="distribution/target"
        )
    content: dict[str, Any] = {}
    if snapshot.previous is not None:
        clear = unseal(
            keyring, snapshot.previous, _context(RollbackSnapshot, snapshot.id, "previous")
        )
        content = json.loads(clear)
    return SnapshotContent(
        existed=snapshot.existed,
        type=content.get("type"),
        data=content.get("data", {}),
        labels=content.get("labels", {}),
        annotations=content.get("annotations", {}),
        resource_version=content.get("resourceVersion"),
        taken_at=snapshot.taken_at,
        written_fingerprint=snapshot.written_fingerprint,
        written_resource_version=snapshot.written_resource_version,
        written_at=snapshot.written_at,
    )


def record_snapshot_write(
    session: Session,
    distribution_id: str,
    target_id: str,
    *,
    fingerprint: str,
    resource_version: str | None,
    written_at: datetime | None = None,
) -> bool:
    """Remember what we wrote (for drift detection); False when no snapshot row exists."""
    snapshot = get_snapshot(session, distribution_id, target_id)
    if snapshot is None:
        return False
    snapshot.written_fingerprint = fingerprint
    snapshot.written_resource_version = resource_version
    snapshot.written_at = written_at or utcnow()
    session.flush()
    return True


# ---------------------------------------------------------------------------- key rotation


def _envelopes(session: Session) -> Iterable[tuple[type[Base], str, str, bytes]]:
    for model, column in ENVELOPE_COLUMNS:
        id_col = model.id  # type: ignore[attr-defined]
        value_col = getattr(model, column)
        query = select(id_col, value_col).where(value_col.is_not(None)).order_by(id_col)
        for row_id, envelope in session.execute(query):
            yield model, column, row_id, envelope


def envelope_key_usage(session: Session) -> Counter[str]:
    """How many stored envelopes each KEK id wraps (to see what a rotation still has to do)."""
    return Counter(envelope_key_id(envelope) for *_, envelope in _envelopes(session))


def rotate_keys(session: Session, keyring: Keyring, to_key_id: str | None = None) -> int:
    """Re-wrap every envelope not yet under ``to_key_id`` (default current); returns the count.

    Only the wrapped data keys change; payload ciphertexts are untouched. Idempotent and
    resumable: rows already under the target KEK are skipped.
    """
    target = keyring.current_key_id if to_key_id is None else to_key_id
    if not keyring.has_key(target):
        raise UnknownKeyError(
            f"cannot rotate to KEK {target!r}: it is not loaded (loaded: "
            f"{', '.join(repr(k) for k in keyring.key_ids)}); add it to CAP_KEK/CAP_KEK_FILE"
        )
    pending = [
        (model, column, row_id, envelope)
        for model, column, row_id, envelope in _envelopes(session)
        if envelope_key_id(envelope) != target
    ]
    for model, column, row_id, envelope in pending:
        rewrapped = rewrap(keyring, envelope, _context(model, row_id, column), target)
        session.execute(
            update(model)
            .where(model.id == row_id)  # type: ignore[attr-defined]
            .values({column: rewrapped})
            .execution_options(synchronize_session=False)
        )
    # Rows already loaded in this session would otherwise keep their old envelope.
    session.expire_all()
    return len(pending)
