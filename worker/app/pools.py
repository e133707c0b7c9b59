"""Worker pools in the pipeline: which pool a target's work goes to, whether a worker may write
an in-cluster target, worker heartbeats, and pools with pending targets but no live worker.

The pure rules (names, queue names, splitting) are :mod:`worker.core.pools`; the statements
are :mod:`models.queries` (targets, workers). Celery is not imported here: tasks/ sends the
messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy.orm import Session

from models import queries
from models.entities import Target
from models.enums import ConnectionMode, RunState
from worker.core.pools import split_by_pool
from worker.kube.identity import in_cluster_identity, refuse_other_cluster
from worker.platform.runtime import Runtime

__all__ = [
    "FORGET_WORKERS_AFTER",
    "HealthSender",
    "SilentPool",
    "check_cluster",
    "forget_heartbeat",
    "hold_back_silent_pools",
    "pools_of",
    "record_heartbeat",
    "silent_after",
    "silent_pools_of_run",
    "wait_for_health_check",
]

log = logging.getLogger(__name__)

#: A worker row silent this long is deleted by the next heartbeat of any worker (pods that are
#: long gone); far beyond any window that judges a pool live.
FORGET_WORKERS_AFTER = timedelta(days=7)


def silent_after(rt: Runtime) -> float:
    """Seconds without a heartbeat after which a pool counts as having no live worker.

    At least three housekeeper intervals (a worker beats once per interval), and never less
    than the reaper's stale window.
    """
    tasks = rt.settings.tasks
    return max(tasks.stale_after, 3 * tasks.reaper_interval)


# --------------------------------------------------------------------------- dispatch


def pools_of(rt: Runtime, target_ids: Sequence[str]) -> dict[str, list[str]]:
    """The targets split by the pool that must process them (one statement)."""
    with rt.session() as session:
        pools = queries.target_pools(session, target_ids)
    return split_by_pool(target_ids, pools)


# ------------------------------------------------------------------ cluster identity


def check_cluster(rt: Runtime, target: Target) -> None:
    """Refuse (:class:`~worker.kube.identity.WrongCluster`) to process an in-cluster target
    from a worker that runs in another cluster than the one recorded on the target.

    A target with no identity yet (saved with ``--no-check``, or before revision 0005) gets
    the one this worker sees, recorded by a conditional update: the first worker of its pool
    pins it, and every later one must match.
    """
    if target.connection_mode is not ConnectionMode.IN_CLUSTER:
        return
    seen = in_cluster_identity(rt.settings.kube.serviceaccount_dir)
    expected = target.cluster_identity
    if expected is None:
        with rt.session() as session:
            expected = queries.pin_cluster_identity(session, target.id, seen) or seen
    refuse_other_cluster(
        target=target.name, pool=rt.settings.tasks.worker_pool, expected=expected, seen=seen
    )


# --------------------------------------------------------------------------- heartbeats


def record_heartbeat(rt: Runtime, worker: str) -> None:
    """This worker is alive in its pool (the housekeeper calls it every reaper interval)."""
    with rt.session() as session:
        # The database's clock, like the reaper that compares with it.
        now = queries.database_now(session)
        queries.record_worker_heartbeat(session, worker, rt.settings.tasks.worker_pool, now=now)
        queries.forget_workers_before(session, now - FORGET_WORKERS_AFTER)


def forget_heartbeat(rt: Runtime, worker: str) -> None:
    """This worker stops cleanly: its pool counts as silent now, not a stale window later, if
    it was the pool's last worker (a killed worker's row simply ages out instead)."""
    with rt.session() as session:
        queries.forget_worker(session, worker)


@dataclass(frozen=True)
class SilentPool:
    """A pool with open targets in a run and no worker heard from recently."""

    pool: str
    open_targets: int
    last_seen: datetime | None
    """The latest heartbeat of any of its workers; None when none was ever recorded."""
    silent_for: float | None
    """Seconds since then (None: never seen)."""

    def describe(self) -> str:
        """One line for ``runs show`` and the run's reason."""
        seen = (
            "no live worker of this pool (none seen yet, or the last one stopped)"
            if self.silent_for is None
            else f"no worker of this pool seen for {self.silent_for:.0f}s"
        )
        return (
            f"pool {self.pool!r}: {self.open_targets} target(s) pending, {seen} — start a "
            f"worker with CAP_WORKER_POOL={self.pool} (the chart's `pool` value) where it can "
            "reach these targets' clusters"
        )


def _silent(
    session: Session, open_by_pool: dict[str, int], *, now: datetime, window: float
) -> list[SilentPool]:
    if not open_by_pool:
        return []
    last_seen = queries.last_seen_by_pool(session, open_by_pool)
    silent = []
    for pool, count in sorted(open_by_pool.items()):
        seen = last_seen.get(pool)
        age = None if seen is None else (now - seen).total_seconds()
        if age is None or age > window:
            silent.append(SilentPool(pool, count, seen, age))
    return silent


def silent_pools_of_run(
    rt: Runtime, run_id: str, *, now: datetime | None = None
) -> list[SilentPool]:
    """The pools that hold open targets of a running run and have no live worker."""
    with rt.session() as session:
        now = now or queries.database_now(session)
        try:
            run = queries.get_run(session, run_id)
        except queries.NotFoundError:
            return []
        if run.state is not RunState.RUNNING:
            return []
        open_by_pool = queries.open_targets_by_pool(session, run_id)
        return _silent(session, open_by_pool, now=now, window=silent_after(rt))


def hold_back_silent_pools(
    rt: Runtime,
    session: Session,
    run_id: str,
    lost: Sequence[str],
    *,
    now: datetime,
    stale_before: datetime,
) -> tuple[list[str], str]:
    """For the reaper: of a stalled run's lost targets, those to re-send, and a note.

    Targets whose pool has no live worker are not re-sent (the message would only join the
    ones waiting in that pool's queue, once per reaper pass); the note names those pools. When
    nothing is left to re-send, the note is written as the run's reason here (no recovery is
    counted) and the run is looked at again after another stale interval.
    """
    if not lost:
        return [], ""
    by_pool = split_by_pool(lost, queries.target_pools(session, lost))
    counts = {pool: len(ids) for pool, ids in by_pool.items()}
    silent = _silent(session, counts, now=now, window=silent_after(rt))
    if not silent:
        return list(lost), ""
    held = {entry.pool for entry in silent}
    send = [target_id for pool, ids in by_pool.items() if pool not in held for target_id in ids]
    note = "; ".join(entry.describe() for entry in silent)
    if not send:
        reason = f"waiting at {now:%Y-%m-%d %H:%M:%S}Z, nothing re-sent: {note}"
        if queries.note_waiting(session, run_id, reason=reason, now=now, stale_before=stale_before):
            log.warning("reaper: run %s waits for a worker: %s", run_id, note)
    return send, f"; not re-sent: {note}"


# ------------------------------------------------------------- health check in a pool


class HealthSender(Protocol):
    """Sends a target's health check to a worker of the target's pool (tasks/ with Celery)."""

    def check_health(self, target_id: str, pool: str, *, record_cluster: bool) -> None:
        """Queue the health check of ``target_id`` on ``pool``'s queue."""


def wait_for_health_check(
    rt: Runtime,
    target_id: str,
    checked_before: datetime | None,
    *,
    timeout: float,
    poll: float = 0.25,
) -> bool:
    """Wait until the target's stored health check is newer than ``checked_before``.

    True when a worker recorded one within ``timeout`` seconds; the database is where the
    worker puts its outcome, so nothing travels back through the broker.
    """
    deadline = time.monotonic() + timeout
    while True:
        with rt.session() as session:
            checked_at = queries.get_target(session, target_id).health_checked_at
        if checked_at is not None and (checked_before is None or checked_at > checked_before):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def pool_last_seen(rt: Runtime, pool: str) -> float | None:
    """Seconds since a worker of ``pool`` last beat (None: never)."""
    with rt.session() as session:
        seen = queries.last_seen_by_pool(session, [pool]).get(pool)
        now = queries.database_now(session)
    return None if seen is None else (now - seen).total_seconds()
