"""Target results: one row per (run, target), claimed, recorded and released with
compare-and-set so that a message delivered twice, late, or never is harmless.

The claim/record/release statements serve one message's targets at once: one transaction
for the claims and one for the records (``executemany``), because per-target transactions
were half of a worker's CPU per target (bench/).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from models.entities import Credential, RollbackSnapshot, Target, TargetResult
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
    "lost_target_ids",
    "record_results",
    "release_claims",
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


#: Free to claim: pending, or running under a lease that expired before ``expired``.
_CLAIMABLE = or_(
    RESULTS.c.status == ResultStatus.PENDING,
    and_(
        RESULTS.c.status == ResultStatus.RUNNING,
        RESULTS.c.started_at < typed_param("expired", RESULTS.c.started_at),
    ),
)
#: Compare-and-set: a claimable row becomes ours.
_CLAIM = (
    update(RESULTS)
    .where(
        RESULTS.c.run_id == bindparam("b_run_id"),
        RESULTS.c.target_id.in_(bindparam("b_target_ids", expanding=True)),
        _CLAIMABLE,
    )
    .values(
        status=ResultStatus.RUNNING,
        started_at=typed_param("now", RESULTS.c.started_at),
        attempts=RESULTS.c.attempts + 1,
    )
    .returning(RESULTS.c.target_id, RESULTS.c.batch_index, RESULTS.c.attempts)
)
#: The targets, their sealed credentials, and whether a final rollback snapshot exists for each.
_LOAD_TARGETS = (
    select(
        Target,
        Credential.secret,
        select(RollbackSnapshot.id)
        .where(
            RollbackSnapshot.distribution_id == bindparam("distribution_id"),
            RollbackSnapshot.target_id == Target.id,
            RollbackSnapshot.written_fingerprint.is_not(None),
        )
        .exists(),
    )
    .outerjoin(Credential, Credential.id == Target.credential_id)
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
)
_RECORD = (
    update(RESULTS)
    .where(_HELD)
    .values({column: typed_param(f"new_{column}", RESULTS.c[column]) for column in _RECORDED})
)
#: A claim given back untouched: pending again, as if this delivery never took it.
_RELEASE = (
    update(RESULTS)
    .where(_HELD)
    .values(status=ResultStatus.PENDING, started_at=None, attempts=RESULTS.c.attempts - 1)
)
#: Any open row left in a batch? Stops at the first instead of counting the batch.
_OPEN_ROW = (
    select(RESULTS.c.id)
    .where(
        RESULTS.c.run_id == bindparam("run_id"),
        RESULTS.c.batch_index == bindparam("batch_index"),
        RESULTS.c.status.in_(_OPEN),
    )
    .limit(1)
)


def claim_results(
    session: Session, run_id: str, target_ids: Sequence[str], *, now: datetime, expired: datetime
) -> dict[str, Claim]:
    """Claim whichever of the targets' result rows are pending, or running with a claim older
    than ``expired``; the claims taken, by target id."""
    rows = session.execute(
        _CLAIM,
        {"b_run_id": run_id, "b_target_ids": list(target_ids), "expired": expired, "now": now},
    )
    return {row.target_id: Claim(row.target_id, row.batch_index, row.attempts) for row in rows}


def load_claimed_targets(
    session: Session, distribution_id: str, target_ids: Sequence[str]
) -> dict[str, ClaimedTarget]:
    """The targets by id, each with its sealed credential and whether a snapshot exists."""
    rows = session.execute(
        _LOAD_TARGETS, {"target_ids": list(target_ids), "distribution_id": distribution_id}
    )
    return {
        target.id: ClaimedTarget(target, envelope, bool(has_snapshot))
        for target, envelope, has_snapshot in rows
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


def release_claims(session: Session, claims: Sequence[HeldClaim]) -> None:
    """Give back claims untouched (pending again, attempt count restored)."""
    session.execute(_RELEASE, [_held(claim) for claim in claims])


def batch_has_open_row(session: Session, run_id: str, batch_index: int) -> bool:
    """Whether any target of the batch is still pending or running."""
    found = session.scalar(_OPEN_ROW, {"run_id": run_id, "batch_index": batch_index})
    return found is not None


#: The reaper's view of a batch: which rows nobody holds, and how many are still held.
_LOST = select(RESULTS.c.target_id).where(
    RESULTS.c.run_id == bindparam("run_id"),
    RESULTS.c.batch_index == bindparam("batch_index"),
    _CLAIMABLE,
)
_LIVE = select(func.count()).where(
    RESULTS.c.run_id == bindparam("run_id"),
    RESULTS.c.batch_index == bindparam("batch_index"),
    RESULTS.c.status == ResultStatus.RUNNING,
    RESULTS.c.started_at >= typed_param("expired", RESULTS.c.started_at),
)


def lost_target_ids(
    session: Session, run_id: str, batch_index: int, *, lease_expired: datetime
) -> list[str]:
    """Targets of the batch nobody holds: pending, or claimed before ``lease_expired``."""
    params = {"run_id": run_id, "batch_index": batch_index, "expired": lease_expired}
    return list(session.scalars(_LOST, params))


def count_live_claims(
    session: Session, run_id: str, batch_index: int, *, lease_expired: datetime
) -> int:
    """Targets of the batch claimed at or after ``lease_expired`` (still being worked on)."""
    params = {"run_id": run_id, "batch_index": batch_index, "expired": lease_expired}
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
    """A run's results with their targets' names, by batch then name (reports, webhooks)."""
    query = (
        select(TargetResult, Target.name)
        .join(Target, Target.id == TargetResult.target_id)
        .where(TargetResult.run_id == run_id)
        .order_by(TargetResult.batch_index, Target.name)
    )
    return [(result, name) for result, name in session.execute(query)]


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
