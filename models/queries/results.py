"""Target results: one row per (run, target), claimed, recorded and released with
compare-and-set so that a message delivered twice, late, or never is harmless.

The claim/record/release statements serve one message's targets at once: one transaction
for the claims and one for the records (``executemany``), because per-target transactions
were half of a worker's CPU per target (bench/).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, func, or_, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, aliased

from models.entities import OPEN_RESULT, Credential, RollbackSnapshot, Target, TargetResult
from models.enums import ResultStatus
from models.queries._statements import RESULTS, typed_param

__all__ = [
    "Claim",
    "ClaimedTarget",
    "HeldClaim",
    "ResultRecord",
    "batch_has_open_row",
    "claim_results",
    "count_live_claims",
    "count_results",
    "list_target_results",
    "load_claimed_targets",
    "mark_batch_sent",
    "record_results",
    "release_claims",
    "renew_claims",
    "resend_lost",
    "results_with_target_names",
    "skip_pending_results",
]

_OPEN = (ResultStatus.PENDING, ResultStatus.RUNNING)


class Claim(NamedTuple):
    """A result row this delivery now holds."""

    target_id: str
    batch_index: int
    attempts: int
    """The attempt number the claim wrote; records and releases compare against it."""


class ClaimedTarget(NamedTuple):
    """A claimed target with its sealed credential and whether its rollback snapshot is final."""

    target: Target
    credential_envelope: bytes | None
    snapshot_final: bool
    """A snapshot exists and our write landed after it: nothing is to be snapshotted again."""
    pkcs12_envelope: bytes | None = None
    """The sealed password of the target's PKCS#12 keystore (None: it writes no keystore)."""


@dataclass(frozen=True)
class HeldClaim:
    """Which claim a record or release is for: (run, target) at this attempt."""

    run_id: str
    target_id: str
    attempt: int


@dataclass(frozen=True)
class ResultRecord:
    """The outcome to write on a held claim's result row."""

    claim: HeldClaim
    status: ResultStatus
    diff: dict[str, Any] | None
    error_reason: str | None
    error_message: str | None
    finished_at: datetime
    duration_ms: int
    resource_version: str | None
    secret_name: str | None
    namespace: str | None
    # What an audit read (revision 0007); None for every other action.
    deployed_serial: str | None = None
    deployed_not_after: datetime | None = None
    finding: dict[str, Any] | None = None
    serving_status: str | None = None
    serving: list[dict[str, Any]] | None = None


_NOW = typed_param("now", RESULTS.c.lease_expires_at)
#: Not held by any delivery: pending, or running under a lease that expired (or that a row
#: claimed before revision 0004 never had). Times are the database's clock.
_FREE = or_(
    RESULTS.c.status == ResultStatus.PENDING,
    and_(
        RESULTS.c.status == ResultStatus.RUNNING,
        or_(RESULTS.c.lease_expires_at.is_(None), RESULTS.c.lease_expires_at < _NOW),
    ),
)
#: Compare-and-set: a free row becomes ours, leased until ``lease_until``.
_CLAIM = (
    update(RESULTS)
    .where(
        RESULTS.c.run_id == bindparam("b_run_id"),
        RESULTS.c.target_id.in_(bindparam("b_target_ids", expanding=True)),
        _FREE,
    )
    .values(
        status=ResultStatus.RUNNING,
        started_at=typed_param("now", RESULTS.c.started_at),
        lease_expires_at=typed_param("lease_until", RESULTS.c.lease_expires_at),
        attempts=RESULTS.c.attempts + 1,
    )
    .returning(RESULTS.c.target_id, RESULTS.c.batch_index, RESULTS.c.attempts)
)
#: The targets, their sealed credentials, and whether a final rollback snapshot exists for each.
_PKCS12_CREDENTIAL = aliased(Credential)
_LOAD_TARGETS = (
    select(
        Target,
        Credential.secret,
        _PKCS12_CREDENTIAL.secret,
        select(RollbackSnapshot.id)
        .where(
            RollbackSnapshot.distribution_id == bindparam("distribution_id"),
            RollbackSnapshot.target_id == Target.id,
            RollbackSnapshot.written_fingerprint.is_not(None),
        )
        .exists(),
    )
    .outerjoin(Credential, Credential.id == Target.credential_id)
    .outerjoin(_PKCS12_CREDENTIAL, _PKCS12_CREDENTIAL.id == Target.pkcs12_credential_id)
    .where(Target.id.in_(bindparam("target_ids", expanding=True)))
)
#: Compare-and-set on (running, attempt): a delivery whose lease was taken over writes nothing.
_HELD = and_(
    RESULTS.c.run_id == bindparam("b_run_id"),
    RESULTS.c.target_id == bindparam("b_target_id"),
    RESULTS.c.status == ResultStatus.RUNNING,
    RESULTS.c.attempts == bindparam("attempt"),
)
_RECORDED = (
    "status",
    "diff",
    "error_reason",
    "error_message",
    "finished_at",
    "duration_ms",
    "resource_version",
    "secret_name",
    "namespace",
    "deployed_serial",
    "deployed_not_after",
    "finding",
    "serving_status",
    "serving",
)
_RECORD = (
    update(RESULTS)
    .where(_HELD)
    .values({column: typed_param(f"new_{column}", RESULTS.c[column]) for column in _RECORDED})
)
#: A claim given back untouched: pending again, as if this delivery never took it, and sent
#: again now (the caller re-queues it right after).
_RELEASE = (
    update(RESULTS)
    .where(_HELD)
    .values(
        status=ResultStatus.PENDING,
        started_at=None,
        lease_expires_at=None,
        sent_at=typed_param("now", RESULTS.c.sent_at),
        attempts=RESULTS.c.attempts - 1,
    )
)
#: The delivering message extends its claims while it works on them.
_RENEW = (
    update(RESULTS)
    .where(_HELD)
    .values(lease_expires_at=typed_param("lease_until", RESULTS.c.lease_expires_at))
)
#: Any open row left in a batch? Stops at the first instead of counting the batch.
_OPEN_ROW = (
    select(RESULTS.c.id)
    .where(
        RESULTS.c.run_id == bindparam("run_id"),
        RESULTS.c.batch_index == bindparam("batch_index"),
        # The partial index's own predicate, as a literal: a planner matches it to the index
        # even in a generic (prepared) plan, where bound statuses would hide it.
        text(OPEN_RESULT),
    )
    .limit(1)
)


def claim_results(
    session: Session,
    run_id: str,
    target_ids: Sequence[str],
    *,
    now: datetime,
    lease_until: datetime,
) -> dict[str, Claim]:
    """Claim whichever of the targets' result rows nobody holds (pending, or running under a
    lease expired at ``now``), leased until ``lease_until``; the claims taken, by target id."""
    rows = session.execute(
        _CLAIM,
        {
            "b_run_id": run_id,
            "b_target_ids": list(target_ids),
            "now": now,
            "lease_until": lease_until,
        },
    )
    return {row.target_id: Claim(row.target_id, row.batch_index, row.attempts) for row in rows}


def load_claimed_targets(
    session: Session, distribution_id: str, target_ids: Sequence[str]
) -> dict[str, ClaimedTarget]:
    """The targets by id, each with its sealed credentials and whether a snapshot exists."""
    rows = session.execute(
        _LOAD_TARGETS, {"target_ids": list(target_ids), "distribution_id": distribution_id}
    )
    return {
        target.id: ClaimedTarget(target, envelope, bool(has_snapshot), pkcs12_envelope)
        for target, envelope, pkcs12_envelope, has_snapshot in rows
    }


def _held(claim: HeldClaim) -> dict[str, Any]:
    return {"b_run_id": claim.run_id, "b_target_id": claim.target_id, "attempt": claim.attempt}


def record_results(session: Session, records: Sequence[ResultRecord]) -> int:
    """Write each outcome whose claim is still held (one executemany); how many were written."""
    rows = [
        {
            **_held(record.claim),
            **{f"new_{column}": getattr(record, column) for column in _RECORDED},
        }
        for record in records
    ]
    return int(session.execute(_RECORD, rows).rowcount)  # type: ignore[attr-defined]


def release_claims(session: Session, claims: Sequence[HeldClaim], *, now: datetime) -> None:
    """Give back claims untouched (pending again, attempt count restored, sent at ``now``)."""
    session.execute(_RELEASE, [{**_held(claim), "now": now} for claim in claims])


def renew_claims(session: Session, claims: Sequence[HeldClaim], *, lease_until: datetime) -> int:
    """Extend the leases of claims still held to ``lease_until``; how many were extended."""
    rows = [{**_held(claim), "lease_until": lease_until} for claim in claims]
    return int(session.execute(_RENEW, rows).rowcount)  # type: ignore[attr-defined]


def mark_batch_sent(session: Session, run_id: str, batch_index: int, *, now: datetime) -> None:
    """Note that the pending targets of a batch were (about to be) sent at ``now``."""
    session.execute(
        update(RESULTS)
        .where(
            RESULTS.c.run_id == run_id,
            RESULTS.c.batch_index == batch_index,
            RESULTS.c.status == ResultStatus.PENDING,
        )
        .values(sent_at=now)
    )


#: PostgreSQL, around the open-row probe only (see batch_has_open_row).
_PROBE_THROUGH_THE_INDEX = text("SET LOCAL enable_seqscan = off")
_PROBE_DONE = text("SET LOCAL enable_seqscan = DEFAULT")


def batch_has_open_row(session: Session, run_id: str, batch_index: int) -> bool:
    """Whether any target of the batch is still pending or running.

    On PostgreSQL the probe runs with sequential scans off (restored right after): with
    LIMIT 1 and statistics saying most rows are open (an ANALYZE early in a run), the planner
    expects a sequential scan to meet an open row at once; but rows are stored in plan order
    and finished first, so a message's probe could read every finished row before the first
    open one (10,000 rows for 1.7 ms at N = 10,000: O(N) per message, O(N^2) per run).
    Through the partial index over open rows it reads one index entry.
    """
    params = {"run_id": run_id, "batch_index": batch_index}
    if session.get_bind().dialect.name != "postgresql":
        return session.scalar(_OPEN_ROW, params) is not None
    session.execute(_PROBE_THROUGH_THE_INDEX)
    found = session.scalar(_OPEN_ROW, params)
    session.execute(_PROBE_DONE)
    return found is not None


#: Lost: nobody holds the row, and no message that could still take it is on its way — it was
#: sent longer ago than ``resend_before`` (or never), or its claim's lease expired after the
#: last send (the worker holding it died).
_LOST = and_(
    _FREE,
    or_(
        RESULTS.c.sent_at.is_(None),
        RESULTS.c.sent_at < typed_param("resend_before", RESULTS.c.sent_at),
        and_(
            RESULTS.c.status == ResultStatus.RUNNING,
            RESULTS.c.sent_at < RESULTS.c.lease_expires_at,
        ),
    ),
)
#: The reaper's compare-and-set: lost rows of a batch are sent again now, by one reaper only.
_RESEND = (
    update(RESULTS)
    .where(
        RESULTS.c.run_id == bindparam("b_run_id"),
        RESULTS.c.batch_index == bindparam("b_batch_index"),
        text(OPEN_RESULT),  # implied by _LOST; spelled out for the partial index (_OPEN_ROW)
        _LOST,
    )
    .values(sent_at=typed_param("now", RESULTS.c.sent_at))
    .returning(RESULTS.c.target_id)
)
_LIVE = select(func.count()).where(
    RESULTS.c.run_id == bindparam("run_id"),
    RESULTS.c.batch_index == bindparam("batch_index"),
    RESULTS.c.status == ResultStatus.RUNNING,
    RESULTS.c.lease_expires_at >= _NOW,
)


def resend_lost(
    session: Session, run_id: str, batch_index: int, *, now: datetime, resend_before: datetime
) -> list[str]:
    """Mark the batch's lost targets sent at ``now`` and return them, for the caller to re-send.

    Conditional: of concurrent reapers, only one gets each lost target.
    """
    params = {
        "b_run_id": run_id,
        "b_batch_index": batch_index,
        "now": now,
        "resend_before": resend_before,
    }
    return sorted(session.scalars(_RESEND, params))


def count_live_claims(session: Session, run_id: str, batch_index: int, *, now: datetime) -> int:
    """Targets of the batch held under a lease that has not expired at ``now``."""
    params = {"run_id": run_id, "batch_index": batch_index, "now": now}
    return int(session.scalar(_LIVE, params) or 0)


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


def results_with_target_names(session: Session, run_id: str) -> list[tuple[TargetResult, str]]:
    """A run's results with their targets' names, by batch then name (webhooks)."""
    query = (
        select(TargetResult, Target.name)
        .join(Target, Target.id == TargetResult.target_id)
        .where(TargetResult.run_id == run_id)
        .order_by(TargetResult.batch_index, Target.name)
    )
    return [(result, name) for result, name in session.execute(query)]


#: A report's row: the result's columns and its target's name, as plain rows. Building an ORM
#: object per row was most of `runs show`'s time on a 10,000-target run (bench/scale.py).
_REPORT_ROWS = (
    select(
        RESULTS.c.target_id,
        Target.name.label("target_name"),
        RESULTS.c.batch_index,
        RESULTS.c.status,
        RESULTS.c.namespace,
        RESULTS.c.secret_name,
        RESULTS.c.error_reason,
        RESULTS.c.error_message,
        RESULTS.c.diff,
        RESULTS.c.attempts,
        RESULTS.c.duration_ms,
        RESULTS.c.resource_version,
        RESULTS.c.deployed_serial,
        RESULTS.c.deployed_not_after,
        RESULTS.c.finding,
        RESULTS.c.serving_status,
        RESULTS.c.serving,
    )
    .join(Target, Target.id == RESULTS.c.target_id)
    .where(RESULTS.c.run_id == bindparam("run_id"))
    .order_by(RESULTS.c.batch_index, Target.name, RESULTS.c.id)
)


def report_rows(
    session: Session, run_id: str, *, offset: int = 0, limit: int | None = None
) -> list[Row[Any]]:
    """A run's results with their targets' names (``target_name``), by batch then name; rows
    ``offset`` to ``offset + limit`` of that order when a page is asked for."""
    query = _REPORT_ROWS.offset(offset).limit(limit)
    return list(session.execute(query, {"run_id": run_id}))


def stream_report_rows(session: Session, run_id: str, *, chunk: int = 1000) -> Iterator[Row[Any]]:
    """The rows of :func:`report_rows`, fetched ``chunk`` at a time over one statement (a
    server-side cursor on PostgreSQL): memory stays flat whatever the run's size. The session
    must stay open while they are read."""
    query = _REPORT_ROWS.execution_options(yield_per=chunk)
    yield from session.execute(query, {"run_id": run_id})


def count_results_of_runs(
    session: Session, run_ids: Sequence[str]
) -> dict[str, Counter[ResultStatus]]:
    """How many of each run's targets are in each status, for several runs in one query."""
    totals: dict[str, Counter[ResultStatus]] = {run_id: Counter() for run_id in run_ids}
    if not run_ids:
        return totals
    query = (
        select(TargetResult.run_id, TargetResult.status, func.count())
        .where(TargetResult.run_id.in_(list(run_ids)))
        .group_by(TargetResult.run_id, TargetResult.status)
    )
    for run_id, status, count in session.execute(query):
        totals[run_id][ResultStatus(status)] = count
    return totals


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
