"""Worker heartbeats per pool, and what the pools of a run's open targets are.

Each worker's housekeeper writes its row every reaper interval; a pool is live while one of
its workers wrote within the caller's window. ``runs show`` and the reaper read this to name
a pool that has pending targets and no worker, instead of waiting (or re-sending) silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from models.entities import Run, Target, TargetResult, WorkerHeartbeat
from models.enums import ResultStatus, RunState

__all__ = [
    "forget_worker",
    "forget_workers_before",
    "last_seen_by_pool",
    "note_waiting",
    "open_targets_by_pool",
    "record_worker_heartbeat",
]

_OPEN = (ResultStatus.PENDING, ResultStatus.RUNNING)


def record_worker_heartbeat(session: Session, worker: str, pool: str, *, now: datetime) -> None:
    """Upsert the worker's row: its pool and ``seen_at = now``."""
    moved = session.execute(
        update(WorkerHeartbeat)
        .where(WorkerHeartbeat.worker == worker)
        .values(pool=pool, seen_at=now)
        .execution_options(synchronize_session=False)
    )
    if int(moved.rowcount) == 0:  # type: ignore[attr-defined]
        # A first beat. Two beats of one worker never race (one housekeeper thread), and
        # worker names are unique, so the insert cannot collide.
        session.add(WorkerHeartbeat(worker=worker, pool=pool, started_at=now, seen_at=now))
        session.flush()


def forget_worker(session: Session, worker: str) -> None:
    """Delete one worker's row: it stopped cleanly, so its pool must not look live for it."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker == worker))


def forget_workers_before(session: Session, before: datetime) -> int:
    """Delete the rows of workers silent since ``before`` (pods long gone); how many."""
    gone = session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < before))
    return int(gone.rowcount)  # type: ignore[attr-defined]


def last_seen_by_pool(session: Session, pools: Iterable[str] | None = None) -> dict[str, datetime]:
    """The latest heartbeat of any worker of each pool (pools never seen are absent)."""
    query = select(WorkerHeartbeat.pool, func.max(WorkerHeartbeat.seen_at)).group_by(
        WorkerHeartbeat.pool
    )
    if pools is not None:
        query = query.where(WorkerHeartbeat.pool.in_(list(pools)))
    return {pool: seen for pool, seen in session.execute(query)}


def open_targets_by_pool(session: Session, run_id: str) -> dict[str, int]:
    """How many of the run's targets are pending or running, per pool."""
    query = (
        select(Target.pool, func.count())
        .select_from(TargetResult)
        .join(Target, Target.id == TargetResult.target_id)
        .where(TargetResult.run_id == run_id, TargetResult.status.in_(_OPEN))
        .group_by(Target.pool)
    )
    return {pool: int(count) for pool, count in session.execute(query)}


def note_waiting(
    session: Session, run_id: str, *, reason: str, now: datetime, stale_before: datetime
) -> bool:
    """Say on a stalled run why nothing was re-sent (no recovery counted); True if written.

    Conditional like a recovery: only while the run is still running and still stale, so a
    run that finished meanwhile keeps its reason. The heartbeat moves, so the reaper looks
    again after another stale interval, not on every pass.
    """
    statement = (
        update(Run)
        .where(Run.id == run_id, Run.state == RunState.RUNNING, Run.heartbeat_at < stale_before)
        .values(reason=reason, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(statement).rowcount) == 1  # type: ignore[attr-defined]
