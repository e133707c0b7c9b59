"""Read-only queries behind the worker's metrics, run at scrape time (see worker.app.metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from models.entities import Certificate, Distribution, Run, TargetResult
from models.enums import DistributionKind, ResultStatus, RunAction, RunState

__all__ = ["DeployedCertificate", "deployed_certificates"]

_WRITTEN = (ResultStatus.CREATED, ResultStatus.UPDATED, ResultStatus.UNCHANGED)


@dataclass(frozen=True)
class DeployedCertificate:
    """What the last successful execute of one Kubernetes distribution deployed."""

    distribution_id: str
    run_id: str
    common_name: str | None
    stored_not_after: datetime
    """The distribution's certificate as stored now (renewed in place, it may be newer)."""
    diff: dict[str, Any] | None
    """A result diff of that run: its ``tls.crt`` entry names what the run wrote."""


def deployed_certificates(session: Session) -> list[DeployedCertificate]:
    """For each Kubernetes distribution with a succeeded execute: its last one's certificate.

    Two statements whatever the fleet: the last succeeded execute run per distribution, then
    one written result (with its diff, when it has one) per such run.
    """
    execute_ok = and_(
        Run.action == RunAction.EXECUTE,
        Run.state == RunState.SUCCEEDED,
        Run.finished_at.is_not(None),
    )
    latest = (
        select(Run.distribution_id, func.max(Run.finished_at).label("finished_at"))
        .where(execute_ok)
        .group_by(Run.distribution_id)
        .subquery()
    )
    rows = session.execute(
        select(Run.id, Run.distribution_id, Certificate.common_name, Certificate.not_after)
        .join(
            latest,
            and_(
                Run.distribution_id == latest.c.distribution_id,
                Run.finished_at == latest.c.finished_at,
            ),
        )
        .join(Distribution, Distribution.id == Run.distribution_id)
        .join(Certificate, Certificate.id == Distribution.certificate_id)
        .where(execute_ok, Distribution.kind == DistributionKind.KUBERNETES)
        .order_by(Run.distribution_id, Run.id)
    ).all()
    run_ids = [row.id for row in rows]
    diffs: dict[str, dict[str, Any]] = {}
    if run_ids:
        first = (
            select(TargetResult.run_id, func.min(TargetResult.id).label("result_id"))
            .where(
                TargetResult.run_id.in_(run_ids),
                TargetResult.status.in_(_WRITTEN),
            )
            .group_by(TargetResult.run_id)
            .subquery()
        )
        for run_id, diff in session.execute(
            select(TargetResult.run_id, TargetResult.diff).join(
                first, TargetResult.id == first.c.result_id
            )
        ):
            diffs[run_id] = diff
    seen: set[str] = set()
    found = []
    for row in rows:
        if row.distribution_id in seen:  # two runs finished in the same instant: keep one
            continue
        seen.add(row.distribution_id)
        found.append(
            DeployedCertificate(
                distribution_id=row.distribution_id,
                run_id=row.id,
                common_name=row.common_name,
                stored_not_after=row.not_after,
                diff=diffs.get(row.id),
            )
        )
    return found
