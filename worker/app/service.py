"""The backend's Python API: what the CertAutoPilot scheduler (and the CLI) call.

Every function takes the process :class:`~worker.runtime.Runtime`; the ones
that start work also take a :class:`~worker.pipeline.Dispatcher` (Celery in
production, see ``tasks.distribution.dispatcher``). Bad input raises
:class:`ServiceError` (or a more specific domain error) *before* anything is
written: the database transaction is rolled back and no cluster is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from models import queries
from models.entities import (
    Certificate,
    Distribution,
    Run,
    Target,
    TargetGroup,
    TargetGroupMember,
    TargetResult,
)
from models.enums import ConnectionMode, CredentialKind, DistributionKind, RunAction, RunState
from models.rollback import Availability, rollback_availability
from worker.app.runs import Dispatcher, utcnow
from worker.core.bundle import TlsBundle, build_bundle
from worker.core.crypto import envelope_key_id
from worker.core.fanout import parse_batch_size, parse_failure_threshold, plan_batches
from worker.core.names import (
    CERTIFICATE_VARIABLES,
    DEFAULT_SECRET_NAME_TEMPLATE,
    TemplateError,
    check_variable_name,
    render_namespace,
    validate_template,
)
from worker.kube.client import KubeClient, RetryPolicy
from worker.kube.connect import in_cluster_available, vet_kubeconfig
from worker.kube.deploy import HealthReport, health_check
from worker.kube.errors import InClusterUnavailable, KubeError
from worker.platform.runtime import Runtime


class ServiceError(ValueError):
    """A request the backend refuses; the message names the problem and the fix."""


class RollbackUnavailable(ServiceError):
    """Rollback cannot run for this distribution; the message is the greyed-out tooltip."""


# --------------------------------------------------------------------------- credentials


def add_kubeconfig_credential(rt: Runtime, name: str, kubeconfig: bytes) -> str:
    """Vet and store a kubeconfig credential (sealed); returns its id."""
    # Vetting first: a kubeconfig that would run programs or read files never gets stored.
    vet_kubeconfig(kubeconfig, allow_insecure=True)
    with rt.session() as session:
        credential = queries.store_credential(
            session, rt.keyring, name, CredentialKind.KUBECONFIG, kubeconfig
        )
        return credential.id


def add_webhook_secret(rt: Runtime, name: str, secret: bytes) -> str:
    """Store an HMAC secret for signing webhook notifications; returns its id."""
    if len(secret) < 16:
        raise ServiceError(
            f"webhook secret {name!r} is {len(secret)} bytes; use at least 16 random bytes "
            "(e.g. `openssl rand -hex 32`)"
        )
    with rt.session() as session:
        credential = queries.store_credential(
            session, rt.keyring, name, CredentialKind.WEBHOOK_HMAC, secret
        )
        return credential.id


# --------------------------------------------------------------------------- certificates


def import_certificate(
    rt: Runtime,
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes = b"",
    ca_pem: bytes | None = None,
    *,
    allow_expired: bool = False,
    passphrase: bytes | None = None,
) -> str:
    """Validate a certificate bundle and store it (key sealed); returns its id."""
    bundle = build_bundle(
        cert_pem,
        key_pem,
        chain_pem,
        ca_pem,
        now=utcnow(),
        allow_expired=allow_expired,
        passphrase=passphrase,
    )
    with rt.session() as session:
        return queries.store_certificate(session, rt.keyring, bundle).id


def renew_certificate(
    rt: Runtime, certificate_id: str, bundle_pems: Mapping[str, bytes]
) -> TlsBundle:
    """Replace a certificate's content with a renewed bundle (same id, so distributions follow)."""
    bundle = build_bundle(
        bundle_pems["cert"],
        bundle_pems["key"],
        bundle_pems.get("chain", b""),
        bundle_pems.get("ca"),
        now=utcnow(),
    )
    with rt.session() as session:
        queries.replace_certificate(session, rt.keyring, certificate_id, bundle)
    return bundle


# ------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class TargetSpec:
    """What an operator fills in on Settings → Distribution → Targets → New."""

    name: str
    namespace: str
    connection_mode: ConnectionMode = ConnectionMode.KUBECONFIG
    credential: str | None = None
    """Credential name or id (kubeconfig mode)."""
    secret_name: str = DEFAULT_SECRET_NAME_TEMPLATE
    include_ca: bool = False
    allow_insecure: bool = False
    adopt_unmanaged: bool = False
    variables: Mapping[str, Any] = field(default_factory=dict)


def create_target(
    rt: Runtime, spec: TargetSpec, *, check: bool = True
) -> tuple[str, HealthResult | None]:
    """Validate and save a target, then (like the UI's Save) run its health check."""
    for variable in spec.variables:
        check_variable_name(variable)
    known = [*CERTIFICATE_VARIABLES, *spec.variables]
    validate_template(spec.namespace, "namespace", known)
    validate_template(spec.secret_name, "secret name", known)
    mode = ConnectionMode(spec.connection_mode)
    if mode is ConnectionMode.IN_CLUSTER and not in_cluster_available(
        rt.settings.kube.serviceaccount_dir, rt.environ
    ):
        raise InClusterUnavailable(
            "in-cluster connection mode is available only when CertAutoPilot runs inside "
            f"Kubernetes: no service-account token in {rt.settings.kube.serviceaccount_dir} "
            "or KUBERNETES_SERVICE_HOST is not set"
        )
    with rt.session() as session:
        credential_id: str | None = None
        if spec.credential is not None:
            credential_id = _credential_id(session, spec.credential)
            if mode is ConnectionMode.KUBECONFIG:
                # Refuse a kubeconfig the connection code would refuse, at save time.
                kubeconfig = queries.reveal_credential(session, rt.keyring, credential_id)
                vet_kubeconfig(kubeconfig, allow_insecure=spec.allow_insecure)
        target = queries.create_target(
            session,
            name=spec.name,
            connection_mode=mode,
            namespace_template=spec.namespace,
            credential_id=credential_id,
            secret_name_template=spec.secret_name,
            include_ca=spec.include_ca,
            allow_insecure=spec.allow_insecure,
            adopt_unmanaged=spec.adopt_unmanaged,
            variables=dict(spec.variables),
        )
        target_id = target.id
    report = check_target_health(rt, target_id) if check else None
    return target_id, report


def _by_name_or_id(session: Any, entity: str, name_or_id: str, by_name: Any, by_id: Any) -> str:
    """The id of the row named ``name_or_id``, else of the row with that id."""
    for lookup in (by_name, by_id):
        try:
            return str(lookup(session, name_or_id).id)
        except queries.NotFoundError:
            continue
    raise queries.NotFoundError(entity, name_or_id, by="name or id")


def _credential_id(session: Any, name_or_id: str) -> str:
    return _by_name_or_id(
        session, "credential", name_or_id, queries.get_credential_by_name, queries.get_credential
    )


@dataclass(frozen=True)
class HealthResult:
    """A stored health-check outcome."""

    target_id: str
    status: str
    message: str
    report: HealthReport | None


def check_target_health(rt: Runtime, target_id: str) -> HealthResult:
    """Read the namespace and review the secret verbs; store the outcome on the target."""
    from worker.app.runs import _api_client  # one place builds clients for targets

    with rt.session() as session:
        target = queries.get_target(session, target_id)
    report: HealthReport | None = None
    try:
        namespace = render_namespace(target.namespace_template, dict(target.variables))
    except TemplateError as exc:
        healthy, message = (
            False,
            (
                f"namespace template needs certificate variables and is checked at distribution "
                f"time ({exc})"
            ),
        )
    else:
        try:
            client = KubeClient(
                _api_client(rt, target), retry=RetryPolicy.from_settings(rt.settings.kube)
            )
            report = health_check(client, namespace)
            healthy, message = report.healthy, report.message
        except KubeError as exc:
            healthy, message = False, str(exc)
    with rt.session() as session:
        stored = queries.record_health(session, target_id, healthy=healthy, message=message)
        return HealthResult(target_id, stored.health_status.value, message, report)


# -------------------------------------------------------------------------------- groups


def create_group(
    rt: Runtime,
    name: str,
    target_names: Sequence[str],
    *,
    batch_size: Any = None,
    failure_threshold: Any = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Create a target group with its fan-out settings; returns its id."""
    if batch_size is not None:
        parse_batch_size(batch_size)
    if failure_threshold is not None:
        parse_failure_threshold(failure_threshold)
    with rt.session() as session:
        target_ids = [_target_id(session, item) for item in target_names]
        group = queries.create_group(
            session,
            name=name,
            target_ids=target_ids,
            batch_size=batch_size,
            failure_threshold=failure_threshold,
            variables=dict(variables or {}),
        )
        return group.id


def _target_id(session: Any, name_or_id: str) -> str:
    return _by_name_or_id(
        session, "target", name_or_id, queries.get_target_by_name, queries.get_target
    )


# ------------------------------------------------------------------------- distributions


def attach(
    rt: Runtime,
    certificate_id: str,
    *,
    target: str | None = None,
    group: str | None = None,
    store_content: bool = False,
) -> str:
    """Attach a certificate to a target or a group (a Kubernetes distribution); returns its id."""
    with rt.session() as session:
        target_id = _target_id(session, target) if target is not None else None
        group_id = None
        if group is not None:
            group_id = _group_id(session, group)
            if not queries.group_target_ids(session, group_id):
                raise ServiceError(
                    f"group {group!r} has no targets; add targets before attaching a distribution"
                )
        return queries.create_distribution(
            session,
            certificate_id=certificate_id,
            target_id=target_id,
            group_id=group_id,
            store_content=store_content,
        ).id


def attach_webhook(rt: Runtime, certificate_id: str, url: str, *, secret: str | None) -> str:
    """Stack a webhook distribution after the certificate's existing ones; returns its id."""
    if not url.startswith(("https://", "http://")):
        raise ServiceError(f"webhook URL {url!r} must start with https:// (or http://)")
    with rt.session() as session:
        credential_id = _credential_id(session, secret) if secret is not None else None
        return queries.create_distribution(
            session,
            certificate_id=certificate_id,
            kind=DistributionKind.WEBHOOK,
            webhook_url=url,
            webhook_credential_id=credential_id,
        ).id


# ----------------------------------------------------------------------------------- runs


def enqueue_run(
    rt: Runtime,
    dispatch: Dispatcher,
    distribution_id: str,
    action: RunAction | str,
    *,
    force: bool = False,
    cascade: bool = True,
) -> str:
    """Queue a dry-run, execute or rollback of a distribution; returns the run id."""
    run_action = RunAction(action)
    with rt.session() as session:
        distribution = queries.get_distribution(session, distribution_id)
        if run_action is RunAction.ROLLBACK:
            availability = distribution_rollback_availability(session, distribution)
            if not availability.available:
                raise RollbackUnavailable(availability.reason)
        if distribution.kind is DistributionKind.WEBHOOK and run_action is not RunAction.EXECUTE:
            raise ServiceError("a webhook distribution can only be executed")
        run = queries.create_run(
            session,
            distribution_id=distribution_id,
            action=run_action,
            options={"force": True} if force else {},
            cascade=cascade and run_action is RunAction.EXECUTE,
        )
        run_id = run.id
    dispatch.start(run_id)
    return run_id


def distribution_rollback_availability(session: Any, distribution: Distribution) -> Availability:
    """Whether the Rollback button is enabled for a distribution (any target with a snapshot)."""
    snapshots = [
        queries.get_snapshot(session, distribution.id, target_id)
        for target_id in queries.distribution_target_ids(session, distribution)
    ]
    present = [snapshot for snapshot in snapshots if snapshot is not None]
    existed = [snapshot for snapshot in present if snapshot.existed]
    chosen = (existed or present)[0] if present else None
    return rollback_availability(distribution, chosen)


@dataclass(frozen=True)
class TargetResultView:
    """One target's line in a run report."""

    target_id: str
    target_name: str
    batch_index: int
    status: str
    namespace: str | None
    secret_name: str | None
    error_reason: str | None
    error_message: str | None
    diff: Mapping[str, Any] | None
    attempts: int
    duration_ms: int | None
    resource_version: str | None


@dataclass(frozen=True)
class RunReport:
    """A run's state and its per-target results (what `runs show` prints)."""

    id: str
    distribution_id: str
    action: str
    state: str
    reason: str | None
    current_batch: int
    batches: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    results: tuple[TargetResultView, ...]

    @property
    def finished(self) -> bool:
        """True once the run reached succeeded, failed or halted."""
        return RunState(self.state).is_terminal

    def counts(self) -> dict[str, int]:
        """How many targets are in each status."""
        totals: dict[str, int] = {}
        for result in self.results:
            totals[result.status] = totals.get(result.status, 0) + 1
        return totals


def run_report(rt: Runtime, run_id: str) -> RunReport:
    """The run's state and per-target results."""
    with rt.session() as session:
        run = queries.get_run(session, run_id)
        return _report(session, run)


def _report(session: Any, run: Run) -> RunReport:
    rows = session.execute(
        select(TargetResult, Target.name)
        .join(Target, Target.id == TargetResult.target_id)
        .where(TargetResult.run_id == run.id)
        .order_by(TargetResult.batch_index, Target.name)
    ).all()
    return RunReport(
        id=run.id,
        distribution_id=run.distribution_id,
        action=run.action.value,
        state=run.state.value,
        reason=run.reason,
        current_batch=run.current_batch,
        batches=len(run.batch_plan or []),
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        results=tuple(
            TargetResultView(
                target_id=result.target_id,
                target_name=name,
                batch_index=result.batch_index,
                status=result.status.value,
                namespace=result.namespace,
                secret_name=result.secret_name,
                error_reason=result.error_reason,
                error_message=result.error_message,
                diff=result.diff,
                attempts=result.attempts,
                duration_ms=result.duration_ms,
                resource_version=result.resource_version,
            )
            for result, name in rows
        ),
    )


def list_runs(
    rt: Runtime, *, distribution_id: str | None = None, limit: int = 50
) -> list[RunReport]:
    """Recent runs, newest first."""
    with rt.session() as session:
        return [
            _report(session, run)
            for run in queries.list_runs(session, distribution_id=distribution_id, limit=limit)
        ]


def stacked_runs(rt: Runtime, run_id: str) -> list[str]:
    """Ids of the runs started by cascading from ``run_id`` (stacked distributions), in order."""
    chain: list[str] = []
    current = run_id
    with rt.session() as session:
        while True:
            child = session.scalars(select(Run.id).where(Run.parent_run_id == current)).first()
            if child is None:
                return chain
            chain.append(child)
            current = child


def read_file(path: Path) -> bytes:
    """Read a file the operator named, with an error that says which file failed."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ServiceError(f"cannot read {path}: {exc.strerror}") from None


# ================================================================ operator views (for the CLI)
#
# Read-side views the CLI (and anything else that lists things) prints: plain frozen
# dataclasses with names resolved, never secret material. Added by the CLI helper.


@dataclass(frozen=True)
class CredentialView:
    """A stored credential as an operator sees it: name and kind, never its contents."""

    id: str
    name: str
    kind: str
    key_id: str
    """Id of the KEK that wraps the credential (what `keys rotate` changes)."""
    created_at: datetime


def list_credentials(rt: Runtime) -> list[CredentialView]:
    """All credentials by name (the sealed secrets are neither decrypted nor returned)."""
    with rt.session() as session:
        return [
            CredentialView(
                id=row.id,
                name=row.name,
                kind=row.kind.value,
                key_id=envelope_key_id(row.secret),
                created_at=row.created_at,
            )
            for row in queries.list_credentials(session)
        ]


@dataclass(frozen=True)
class CertificateView:
    """A stored certificate's public facts (the private key stays sealed)."""

    id: str
    common_name: str | None
    sans: tuple[str, ...]
    serial: str
    issuer: str
    not_before: datetime
    not_after: datetime
    sha256_fingerprint: str
    intermediates: int
    has_ca: bool
    created_at: datetime

    def days_left(self, now: datetime) -> int:
        """Whole days until expiry (negative once expired)."""
        return (self.not_after - now).days


def _certificate_view(row: Certificate) -> CertificateView:
    return CertificateView(
        id=row.id,
        common_name=row.common_name,
        sans=tuple(str(name) for name in row.sans),
        serial=row.serial_hex,
        issuer=row.issuer,
        not_before=row.not_before,
        not_after=row.not_after,
        sha256_fingerprint=row.sha256_fingerprint,
        intermediates=row.chain_pem.count("-----BEGIN CERTIFICATE-----"),
        has_ca=row.ca_pem is not None,
        created_at=row.created_at,
    )


def list_certificates(rt: Runtime) -> list[CertificateView]:
    """All certificates, oldest first."""
    with rt.session() as session:
        return [_certificate_view(row) for row in queries.list_certificates(session)]


def get_certificate(rt: Runtime, certificate_id: str) -> CertificateView:
    """One certificate's public facts, or NotFoundError."""
    with rt.session() as session:
        return _certificate_view(queries.get_certificate(session, certificate_id))


@dataclass(frozen=True)
class TargetView:
    """A target with its credential and groups named, and its last health check."""

    id: str
    name: str
    connection_mode: str
    credential: str | None
    namespace: str
    secret_name: str
    include_ca: bool
    allow_insecure: bool
    adopt_unmanaged: bool
    variables: Mapping[str, Any]
    health_status: str
    health_message: str | None
    health_checked_at: datetime | None
    groups: tuple[str, ...]


def _target_view(session: Any, row: Target) -> TargetView:
    credential = (
        queries.get_credential(session, row.credential_id).name
        if row.credential_id is not None
        else None
    )
    groups = session.scalars(
        select(TargetGroup.name)
        .join(TargetGroupMember, TargetGroupMember.group_id == TargetGroup.id)
        .where(TargetGroupMember.target_id == row.id)
        .order_by(TargetGroup.name)
    ).all()
    return TargetView(
        id=row.id,
        name=row.name,
        connection_mode=row.connection_mode.value,
        credential=credential,
        namespace=row.namespace_template,
        secret_name=row.secret_name_template,
        include_ca=row.include_ca,
        allow_insecure=row.allow_insecure,
        adopt_unmanaged=row.adopt_unmanaged,
        variables=dict(row.variables),
        health_status=row.health_status.value,
        health_message=row.health_message,
        health_checked_at=row.health_checked_at,
        groups=tuple(groups),
    )


def list_targets(rt: Runtime) -> list[TargetView]:
    """All targets by name."""
    with rt.session() as session:
        return [_target_view(session, row) for row in queries.list_targets(session)]


def get_target(rt: Runtime, name_or_id: str) -> TargetView:
    """One target by name or id, or NotFoundError."""
    with rt.session() as session:
        return _target_view(session, queries.get_target(session, _target_id(session, name_or_id)))


@dataclass(frozen=True)
class GroupView:
    """A group with its members in fan-out order and the batches a run would use today."""

    id: str
    name: str
    batch_size: str
    """As configured, or the settings default (marked "(default)")."""
    failure_threshold: str
    variables: Mapping[str, Any]
    targets: tuple[str, ...]
    """Member target names in fan-out order."""
    batches: tuple[tuple[str, ...], ...]
    """Target names per batch, as a run started now would plan them."""


def _group_id(session: Any, name_or_id: str) -> str:
    return _by_name_or_id(
        session, "group", name_or_id, queries.get_group_by_name, queries.get_group
    )


def _group_view(rt: Runtime, session: Any, row: TargetGroup) -> GroupView:
    members = queries.group_targets(session, row.id)
    names = {target.id: target.name for target in members}
    batch_value: Any = row.batch_size
    batch_text = str(parse_batch_size(batch_value)) if batch_value is not None else ""
    if batch_value is None:
        batch_value = rt.settings.fanout.default_batch_size
        batch_text = f"{parse_batch_size(batch_value)} (default)"
    threshold_value = row.failure_threshold
    threshold_text = (
        str(parse_failure_threshold(threshold_value))
        if threshold_value is not None
        else f"{parse_failure_threshold(rt.settings.fanout.default_failure_threshold)} (default)"
    )
    plan = (
        plan_batches([target.id for target in members], parse_batch_size(batch_value))
        if members
        else []
    )
    return GroupView(
        id=row.id,
        name=row.name,
        batch_size=batch_text,
        failure_threshold=threshold_text,
        variables=dict(row.variables),
        targets=tuple(target.name for target in members),
        batches=tuple(tuple(names[target_id] for target_id in batch) for batch in plan),
    )


def list_groups(rt: Runtime) -> list[GroupView]:
    """All groups by name."""
    with rt.session() as session:
        return [_group_view(rt, session, row) for row in queries.list_groups(session)]


def get_group(rt: Runtime, name_or_id: str) -> GroupView:
    """One group by name or id, or NotFoundError."""
    with rt.session() as session:
        return _group_view(rt, session, queries.get_group(session, _group_id(session, name_or_id)))


def add_group_targets(rt: Runtime, group: str, target_names: Sequence[str]) -> GroupView:
    """Append targets (names or ids) to a group's fan-out order; returns the updated group."""
    with rt.session() as session:
        group_id = _group_id(session, group)
        current = queries.group_target_ids(session, group_id)
        added = [_target_id(session, item) for item in target_names]
        pairs = zip(target_names, added, strict=True)
        already = sorted(name for name, target_id in pairs if target_id in current)
        if already:
            raise ServiceError(
                f"group {group!r} already contains {', '.join(repr(n) for n in already)}; "
                "list only targets that are not members yet"
            )
        queries.set_group_members(session, group_id, [*current, *added])
        return _group_view(rt, session, queries.get_group(session, group_id))


@dataclass(frozen=True)
class DistributionView:
    """A distribution with its certificate, destination and rollback button state."""

    id: str
    certificate_id: str
    certificate_cn: str | None
    kind: str
    position: int
    target: str | None
    group: str | None
    webhook_url: str | None
    store_content: bool
    target_count: int
    rollback_available: bool
    rollback_reason: str
    """Why Rollback is enabled or greyed out (the tooltip)."""

    @property
    def destination(self) -> str:
        """Where it distributes to, in words: "target X", "group Y" or the webhook URL."""
        if self.target is not None:
            return f"target {self.target}"
        if self.group is not None:
            return f"group {self.group}"
        return f"webhook {self.webhook_url}"


def _distribution_view(session: Any, row: Distribution) -> DistributionView:
    certificate = queries.get_certificate(session, row.certificate_id)
    availability = distribution_rollback_availability(session, row)
    return DistributionView(
        id=row.id,
        certificate_id=row.certificate_id,
        certificate_cn=certificate.common_name,
        kind=row.kind.value,
        position=row.position,
        target=queries.get_target(session, row.target_id).name if row.target_id else None,
        group=queries.get_group(session, row.group_id).name if row.group_id else None,
        webhook_url=row.webhook_url,
        store_content=row.store_content,
        target_count=len(queries.distribution_target_ids(session, row)),
        rollback_available=availability.available,
        rollback_reason=availability.reason,
    )


def list_distributions(rt: Runtime, certificate_id: str | None = None) -> list[DistributionView]:
    """Distributions (of one certificate, or all) in stacking order."""
    with rt.session() as session:
        if certificate_id is not None:
            queries.get_certificate(session, certificate_id)  # NotFoundError for a typo
        return [
            _distribution_view(session, row)
            for row in queries.list_distributions(session, certificate_id)
        ]


def get_distribution(rt: Runtime, distribution_id: str) -> DistributionView:
    """One distribution, or NotFoundError."""
    with rt.session() as session:
        return _distribution_view(session, queries.get_distribution(session, distribution_id))
