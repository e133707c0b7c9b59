"""The audit: what is deployed where, today (read-only runs of action ``audit``).

An audit is an ordinary run of a Kubernetes distribution with action ``audit``: planned,
claimed, processed and recorded by :mod:`worker.app.runs` like an execute (batched messages
of target ids, leases, the reaper), except that each target costs one GET and nothing else —
no write, no snapshot, no server-side dry run, no private key opened — and that nothing halts
it (a failed read harms nothing; the group's failure threshold does not apply). It takes no
"one active mutation" lock: it can run beside an execute or a rollback of its distribution.

Runs belong to a distribution (the certificate they compare with is the distribution's, pinned
at enqueue), so an audit of a group or of everything is **one audit run per Kubernetes
distribution**: :func:`enqueue_audit` creates them in one transaction and returns their ids;
:func:`audit_report` merges their results into one list ordered by urgency
(:func:`worker.core.audit.urgency`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from models import queries
from models.entities import Distribution
from models.enums import DistributionKind, ResultStatus, RunAction, RunState
from worker.app.commands import ServiceError
from worker.app.dispatch import Dispatcher
from worker.app.views import resolve_group
from worker.core.audit import (
    AUDIT_STATES,
    DEFAULT_WARN_DAYS,
    days_left,
    failure_state,
    urgency,
)
from worker.platform.runtime import Runtime

__all__ = ["AuditReport", "AuditRow", "AuditRun", "audit_report", "enqueue_audit"]


def _kubernetes_distributions(
    session: Any, *, distribution: str | None, group: str | None, every: bool
) -> list[Distribution]:
    chosen = sum((distribution is not None, group is not None, every))
    if chosen != 1:
        raise ServiceError(
            "choose exactly one of --distribution DIST, --group GROUP or --all (what to audit)"
        )
    if distribution is not None:
        row = queries.get_distribution(session, distribution)
        if row.kind is not DistributionKind.KUBERNETES:
            raise ServiceError(
                f"distribution {distribution} is a {row.kind.value} distribution; only "
                "Kubernetes distributions deploy Secrets to audit"
            )
        return [row]
    kubernetes = [
        row
        for row in queries.list_distributions(session)
        if row.kind is DistributionKind.KUBERNETES
    ]
    if group is not None:
        group_id = resolve_group(session, group)
        attached = [row for row in kubernetes if row.group_id == group_id]
        if not attached:
            raise ServiceError(
                f"group {group!r} has no Kubernetes distribution attached: an audit compares "
                "each target's Secret with a distribution's certificate; attach one with "
                f"`certautopilot distributions attach CERT --group {group}`"
            )
        return attached
    if not kubernetes:
        raise ServiceError(
            "there is no Kubernetes distribution to audit; attach a certificate to a target or "
            "group first (`certautopilot distributions attach CERT --target T`)"
        )
    return kubernetes


def enqueue_audit(
    rt: Runtime,
    dispatch: Dispatcher,
    *,
    distribution: str | None = None,
    group: str | None = None,
    every: bool = False,
) -> list[str]:
    """Queue one audit run per Kubernetes distribution chosen (exactly one of ``distribution``
    id, ``group`` name or id, or ``every``); returns the run ids. Nothing is queued on error.

    ``service.enqueue_run(rt, dispatcher, distribution_id, "audit")`` queues one.
    """
    with rt.session() as session:
        rows = _kubernetes_distributions(
            session, distribution=distribution, group=group, every=every
        )
        run_ids = [
            queries.create_run(session, distribution_id=row.id, action=RunAction.AUDIT).id
            for row in rows
        ]
    for run_id in run_ids:
        dispatch.start(run_id)
    return run_ids


@dataclass(frozen=True)
class AuditRow:
    """One target of one audited distribution: what its Secret holds."""

    run_id: str
    distribution_id: str
    common_name: str | None
    target_id: str
    target_name: str
    namespace: str | None
    secret_name: str | None
    state: str
    """current, outdated, drifted, unmanaged, missing; unreachable, forbidden or failed when
    the Secret could not be read; pending/running/skipped while the run is not done."""
    detail: str
    serial: str | None
    """Serial (hex) of the deployed leaf (the first certificate of ``tls.crt``)."""
    not_after: datetime | None
    days_left: int | None
    """Whole days from the read until ``not_after`` (negative: expired)."""
    revision: int | None
    """The revision of the distribution's certificate the Secret holds, when it holds one."""
    compared_with: int | None
    """The revision the audit compared with (pinned when it was enqueued)."""
    error_reason: str | None
    checked_at: datetime | None
    duration_ms: int | None


@dataclass(frozen=True)
class AuditRun:
    """One audit run's state (one per distribution)."""

    id: str
    distribution_id: str
    state: str
    reason: str | None

    @property
    def finished(self) -> bool:
        """True once the run reached a final state."""
        return RunState(self.state).is_terminal


@dataclass(frozen=True)
class AuditReport:
    """The audit runs of one request and their rows, most urgent first."""

    runs: tuple[AuditRun, ...]
    rows: tuple[AuditRow, ...]
    warn_days: int

    @property
    def finished(self) -> bool:
        """True once every run finished."""
        return all(run.finished for run in self.runs)

    def counts(self) -> dict[str, int]:
        """How many targets are in each state."""
        totals: dict[str, int] = {}
        for row in self.rows:
            totals[row.state] = totals.get(row.state, 0) + 1
        return totals

    def expired(self) -> int:
        """How many deployed leaves had expired when they were read."""
        return sum(1 for row in self.rows if row.days_left is not None and row.days_left < 0)


def _row(
    run_id: str,
    distribution_id: str,
    common_name: str | None,
    compared_with: int | None,
    result: Any,
    target_name: str,
) -> AuditRow:
    status = result.status
    finding = result.finding or {}
    if status is ResultStatus.FAILED:
        state = failure_state(result.error_reason)
        detail = f"[{result.error_reason}] {result.error_message or ''}".strip()
    elif status.value in AUDIT_STATES:
        state, detail = status.value, str(finding.get("detail") or "")
    else:  # pending, running, skipped
        state, detail = status.value, result.error_message or ""
    checked_at = result.finished_at
    left = (
        days_left(result.deployed_not_after, checked_at)
        if result.deployed_not_after is not None and checked_at is not None
        else None
    )
    return AuditRow(
        run_id=run_id,
        distribution_id=distribution_id,
        common_name=common_name,
        target_id=result.target_id,
        target_name=target_name,
        namespace=result.namespace,
        secret_name=result.secret_name,
        state=state,
        detail=detail,
        serial=result.deployed_serial,
        not_after=result.deployed_not_after,
        days_left=left,
        revision=finding.get("revision"),
        compared_with=compared_with,
        error_reason=result.error_reason,
        checked_at=checked_at,
        duration_ms=result.duration_ms,
    )


#: Rows not read (yet): after every read one.
_NOT_READ = {
    ResultStatus.SKIPPED.value: 8,
    ResultStatus.RUNNING.value: 9,
    ResultStatus.PENDING.value: 9,
}


def _sort_key(row: AuditRow, now: datetime, warn_days: int) -> tuple[Any, ...]:
    if row.state in _NOT_READ:
        return (_NOT_READ[row.state], 0.0, row.target_name, row.run_id)
    rank, left = urgency(row.state, row.not_after, row.checked_at or now, warn_days=warn_days)
    return (rank, left, row.target_name, row.run_id)


def audit_report(
    rt: Runtime,
    run_ids: Sequence[str],
    *,
    warn_days: int = DEFAULT_WARN_DAYS,
    now: datetime | None = None,
) -> AuditReport:
    """The audit runs' states and every target's row, most urgent first (expired, expiring
    within ``warn_days``, drifted, missing, unreadable, outdated, unmanaged, current)."""
    if warn_days < 0:
        raise ServiceError(f"--warn-days must be 0 or more, not {warn_days}")
    runs: list[AuditRun] = []
    rows: list[AuditRow] = []
    with rt.session() as session:
        for run_id in run_ids:
            run = queries.get_run(session, run_id)
            if run.action is not RunAction.AUDIT:
                raise ServiceError(
                    f"run {run_id} is a {run.action.value} run, not an audit; show it with "
                    f"`certautopilot runs show {run_id}`"
                )
            distribution = queries.get_distribution(session, run.distribution_id)
            certificate = queries.get_certificate(session, distribution.certificate_id)
            compared_with = (
                queries.get_revision(session, run.certificate_revision_id).number
                if run.certificate_revision_id is not None
                else None
            )
            runs.append(AuditRun(run.id, run.distribution_id, run.state.value, run.reason))
            rows.extend(
                _row(run.id, run.distribution_id, certificate.common_name, compared_with, r, name)
                for r, name in queries.results_with_target_names(session, run.id)
            )
    moment = now or datetime.now(UTC)
    rows.sort(key=lambda row: _sort_key(row, moment, warn_days))
    return AuditReport(runs=tuple(runs), rows=tuple(rows), warn_days=warn_days)
