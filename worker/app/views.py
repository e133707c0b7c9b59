"""Read views: what the CLI and the scheduler show (runs with their per-target results,
certificates, targets, groups, distributions), as frozen dataclasses with names resolved and
never any secret material; plus the name-or-id lookups commands share.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from models import queries
from models.entities import Certificate, Distribution, Run, Target, TargetGroup
from models.enums import ResultStatus, RunState
from models.rollback import Availability, rollback_availability
from worker.app.fanout import group_fanout
from worker.core.crypto import envelope_key_id
from worker.core.fanout import plan_batches
from worker.core.serving import OWN_CHAIN
from worker.platform.runtime import Runtime


def distribution_rollback_availability(
    session: Session, distribution: Distribution
) -> Availability:
    """Whether the Rollback button is enabled for a distribution (any target with a snapshot)."""
    return rollback_availability(distribution, queries.distribution_snapshot(session, distribution))


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
    deployed_serial: str | None = None
    """Audit runs: serial of the deployed leaf (the first certificate of tls.crt)."""
    deployed_not_after: datetime | None = None
    """Audit runs: its not-after."""
    finding: Mapping[str, Any] | None = None
    """Audit runs: what the read found (state, detail, fingerprint, revision, writer)."""
    serving_status: str | None = None
    """verified, stale, chain_invalid, unreachable or not_verified; None: not verified."""
    serving: tuple[Mapping[str, Any], ...] = ()
    """Per endpoint: state, seconds, attempts, serial, not_after, reason, chain, line."""

    def serving_lines(self) -> list[str]:
        """``serving <endpoint>: <outcome>`` per endpoint (empty when nothing was verified)."""
        return [f"serving {item['endpoint']}: {item['line']}" for item in self.serving]


@dataclass(frozen=True)
class RevisionView:
    """Which version of a certificate a run deploys."""

    certificate_id: str
    revision: int
    serial: str
    sha256_fingerprint: str
    not_after: datetime

    def describe(self) -> str:
        """One line for people: revision, serial, fingerprint prefix, not-after."""
        return (
            f"revision {self.revision} (serial {self.serial}, sha256 "
            f"{self.sha256_fingerprint[:16]}…, not after {self.not_after:%Y-%m-%d %H:%M}Z)"
        )


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
    certificate: RevisionView | None
    """The certificate revision the run deploys (pinned when it was enqueued)."""
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    results: tuple[TargetResultView, ...]
    """The per-target results: all of them, or the page asked for (``results_offset`` on)."""
    totals: Mapping[str, int] = field(default_factory=dict)
    """How many of the run's targets are in each status (all of them, whatever the page)."""
    results_offset: int = 0
    """Where ``results`` starts in the run's result order (batch, then target name)."""

    @property
    def finished(self) -> bool:
        """True once the run reached succeeded, failed or halted."""
        return RunState(self.state).is_terminal

    @property
    def target_count(self) -> int:
        """How many targets the run has (not only those of the page in ``results``)."""
        return sum(self.totals.values())

    def counts(self) -> dict[str, int]:
        """How many targets are in each status (of the whole run)."""
        return {status: count for status, count in self.totals.items() if count}


def run_report(rt: Runtime, run_id: str, *, offset: int = 0, limit: int | None = None) -> RunReport:
    """The run's state, its counts by status, and its per-target results: all of them, or
    ``limit`` of them from ``offset`` (a page of a large run; ``limit=0``: counts only).

    A fixed number of statements whatever the run's size (tests/unit/test_scale_queries.py).
    """
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"a page starts at offset >= 0 and has limit >= 0, not {offset}/{limit}")
    with rt.session() as session:
        run = queries.get_run(session, run_id, with_batch_count=True)
        totals = queries.count_results_of_runs(session, [run.id])[run.id]
        return _report(session, run, totals, offset=offset, limit=limit)


def stream_run_results(rt: Runtime, run_id: str) -> Iterator[TargetResultView]:
    """Every per-target result of a run, in report order, read in chunks over one statement
    (``runs show --all -o json`` writes them as they come instead of building one document)."""
    with rt.session() as session:
        for row in queries.stream_report_rows(session, run_id):
            yield _result_view(row)


def _result_view(row: Any) -> TargetResultView:
    return TargetResultView(
        target_id=row.target_id,
        target_name=row.target_name,
        batch_index=row.batch_index,
        status=ResultStatus(row.status).value,
        namespace=row.namespace,
        secret_name=row.secret_name,
        error_reason=row.error_reason,
        error_message=row.error_message,
        diff=row.diff,
        attempts=row.attempts,
        duration_ms=row.duration_ms,
        resource_version=row.resource_version,
        deployed_serial=row.deployed_serial,
        deployed_not_after=row.deployed_not_after,
        finding=row.finding,
        serving_status=row.serving_status,
        serving=tuple(row.serving or ()),
    )


def _revision_view(session: Session, run: Run) -> RevisionView | None:
    if run.certificate_revision_id is None:
        return None
    revision = queries.get_revision(session, run.certificate_revision_id)
    return RevisionView(
        certificate_id=revision.certificate_id,
        revision=revision.number,
        serial=revision.serial_hex,
        sha256_fingerprint=revision.sha256_fingerprint,
        not_after=revision.not_after,
    )


def _report(
    session: Session,
    run: Run,
    totals: Mapping[ResultStatus, int],
    *,
    offset: int = 0,
    limit: int | None = None,
) -> RunReport:
    rows = queries.report_rows(session, run.id, offset=offset, limit=limit) if limit != 0 else []
    return RunReport(
        id=run.id,
        distribution_id=run.distribution_id,
        action=run.action.value,
        state=run.state.value,
        reason=run.reason,
        current_batch=run.current_batch,
        batches=run.batch_count or 0,
        certificate=_revision_view(session, run),
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        results=tuple(_result_view(row) for row in rows),
        totals={status.value: count for status, count in sorted(totals.items()) if count},
        results_offset=offset,
    )


def list_runs(
    rt: Runtime,
    *,
    distribution_id: str | None = None,
    limit: int = 50,
    with_results: bool = False,
) -> list[RunReport]:
    """Recent runs, newest first, each with its counts by status; ``with_results`` adds every
    per-target result (a run of 10,000 targets is 10,000 rows: ask for it only when needed).

    A fixed number of statements whatever the runs' sizes, plus one per run
    ``with_results`` (tests/unit/test_scale_queries.py).
    """
    with rt.session() as session:
        runs = queries.list_runs(session, distribution_id=distribution_id, limit=limit)
        totals = queries.count_results_of_runs(session, [run.id for run in runs])
        pinned = sorted({r for run in runs if (r := run.certificate_revision_id) is not None})
        # Held while the reports are built: the session finds each run's revision in its
        # identity map (which keeps only referenced objects) instead of asking once per run.
        revisions = queries.load_revisions(session, pinned)
        reports = [
            _report(session, run, totals[run.id], limit=None if with_results else 0) for run in runs
        ]
        del revisions
        return reports


def stacked_runs(rt: Runtime, run_id: str) -> list[str]:
    """Ids of the runs started by cascading from ``run_id`` (stacked distributions), in order."""
    chain: list[str] = []
    current = run_id
    with rt.session() as session:
        while True:
            child = queries.child_run_id(session, current)
            if child is None:
                return chain
            chain.append(child)
            current = child


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
    allow_system_namespace: bool
    variables: Mapping[str, Any]
    health_status: str
    health_message: str | None
    health_checked_at: datetime | None
    groups: tuple[str, ...]
    pool: str = "default"
    cluster_identity: str | None = None
    combined_pem: bool = False
    """Writes ``tls-combined.pem`` too."""
    pkcs12_password_credential: str | None = None
    """Name of the credential whose password encrypts ``keystore.p12`` (None: no keystore)."""
    verify_serving: tuple[str, ...] = ()
    """Endpoints verified after an execute (``host:port[,sni=NAME]``)."""
    serving_deadline_seconds: int | None = None
    """None: the default (worker.core.serving.DEFAULT_DEADLINE_SECONDS)."""
    serving_ca: str | None = None
    """"own-chain", "bundle" (a PEM bundle is stored; not repeated here), or None."""
    serving_public_only: bool = False


def _serving_ca_kind(serving_ca: str | None) -> str | None:
    if serving_ca is None or serving_ca == OWN_CHAIN:
        return serving_ca
    return "bundle"


def _target_view(session: Session, row: Target) -> TargetView:
    credential = (
        queries.get_credential(session, row.credential_id).name
        if row.credential_id is not None
        else None
    )
    groups = queries.target_group_names(session, row.id)
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
        allow_system_namespace=row.allow_system_namespace,
        variables=dict(row.variables),
        health_status=row.health_status.value,
        health_message=row.health_message,
        health_checked_at=row.health_checked_at,
        groups=tuple(groups),
        pool=row.pool,
        cluster_identity=row.cluster_identity,
        combined_pem=row.combined_pem,
        pkcs12_password_credential=(
            queries.get_credential(session, row.pkcs12_credential_id).name
            if row.pkcs12_credential_id is not None
            else None
        ),
        verify_serving=tuple(row.serving_endpoints or ()),
        serving_deadline_seconds=row.serving_deadline_seconds,
        serving_ca=_serving_ca_kind(row.serving_ca),
        serving_public_only=row.serving_public_only,
    )


def list_targets(rt: Runtime) -> list[TargetView]:
    """All targets by name."""
    with rt.session() as session:
        return [_target_view(session, row) for row in queries.list_targets(session)]


def get_target(rt: Runtime, name_or_id: str) -> TargetView:
    """One target by name or id, or NotFoundError."""
    with rt.session() as session:
        return _target_view(
            session, queries.get_target(session, resolve_target(session, name_or_id))
        )


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
    require_serving: bool = False
    """A member not serving the new certificate by its deadline counts as failed."""


def _shown(setting: object, *, default: bool) -> str:
    return f"{setting} (default)" if default else str(setting)


def group_view(rt: Runtime, session: Session, row: TargetGroup) -> GroupView:
    """A group as shown to an operator, with the batches a run started now would use."""
    members = queries.group_member_names(session, row.id)
    names = dict(members)
    fanout = group_fanout(rt, row)
    plan = (
        plan_batches([target_id for target_id, _ in members], fanout.batch_size) if members else []
    )
    return GroupView(
        id=row.id,
        name=row.name,
        batch_size=_shown(fanout.batch_size, default=fanout.batch_size_is_default),
        failure_threshold=_shown(fanout.threshold, default=fanout.threshold_is_default),
        variables=dict(row.variables),
        targets=tuple(name for _, name in members),
        batches=tuple(tuple(names[target_id] for target_id in batch) for batch in plan),
        require_serving=row.require_serving,
    )


def list_groups(rt: Runtime) -> list[GroupView]:
    """All groups by name."""
    with rt.session() as session:
        return [group_view(rt, session, row) for row in queries.list_groups(session)]


def get_group(rt: Runtime, name_or_id: str) -> GroupView:
    """One group by name or id, or NotFoundError."""
    with rt.session() as session:
        return group_view(
            rt, session, queries.get_group(session, resolve_group(session, name_or_id))
        )


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


def _distribution_view(session: Session, row: Distribution) -> DistributionView:
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


def resolve_by_name_or_id(
    session: Session, entity: str, name_or_id: str, by_name: Any, by_id: Any
) -> str:
    """The id of the row named ``name_or_id``, else of the row with that id."""
    for lookup in (by_name, by_id):
        try:
            return str(lookup(session, name_or_id).id)
        except queries.NotFoundError:
            continue
    raise queries.NotFoundError(entity, name_or_id, by="name or id")


def resolve_credential(session: Session, name_or_id: str) -> str:
    return resolve_by_name_or_id(
        session, "credential", name_or_id, queries.get_credential_by_name, queries.get_credential
    )


def resolve_target(session: Session, name_or_id: str) -> str:
    return resolve_by_name_or_id(
        session, "target", name_or_id, queries.get_target_by_name, queries.get_target
    )


def resolve_group(session: Session, name_or_id: str) -> str:
    return resolve_by_name_or_id(
        session, "group", name_or_id, queries.get_group_by_name, queries.get_group
    )
