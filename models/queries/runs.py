"""Runs: create, start (plan + pending results), advance a batch, finish, and what the reaper
looks for. The state machine that drives them is worker.app.runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Insert,
    Interval,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, undefer

from models.base import new_id
from models.entities import ACTIVE_MUTATION, CertificateRevision, Distribution, Run, TargetGroup
from models.enums import ResultStatus, RunAction, RunState
from models.errors import ActiveRunError, NotFoundError, RunStateError
from models.queries._statements import RESULTS, RUNS, typed_param
from models.queries.certificates import current_revision
from models.queries.distributions import get_distribution

__all__ = [
    "advance_batch",
    "child_run_id",
    "create_run",
    "database_now",
    "finish_run",
    "get_run",
    "heartbeat",
    "heartbeat_now",
    "list_runs",
    "load_run_context",
    "load_run_context_at",
    "note_recovery",
    "recoveries",
    "resend_queued_starts",
    "running_runs",
    "start_run",
]

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
    certificate_revision_id: str | None = None,
) -> Run:
    """Insert a queued run for a distribution, pinned to a certificate revision.

    The run deploys ``certificate_revision_id`` (a stacked run passes its parent's), by default
    the certificate's newest revision at this moment: a renewal afterwards does not change
    what this run deploys.

    :class:`ActiveRunError` (nothing written) when it is an execute or rollback requested
    directly (no parent) and the distribution has one queued or running already: the database's
    partial unique index decides, so two concurrent callers cannot both get one.
    """
    distribution = get_distribution(session, distribution_id)
    if certificate_revision_id is None:
        certificate_revision_id = current_revision(session, distribution.certificate_id).id
    run = Run(
        distribution_id=distribution_id,
        certificate_revision_id=certificate_revision_id,
        action=RunAction(action),
        state=RunState.QUEUED,
        options=dict(options or {}),
        cascade=cascade,
        parent_run_id=parent_run_id,
        batch_plan=[],
        current_batch=0,
    )
    try:
        with session.begin_nested():
            session.add(run)
    except IntegrityError:
        active = session.scalars(
            select(Run).where(Run.distribution_id == distribution_id, text(ACTIVE_MUTATION))
        ).first()
        if active is None:  # some other constraint: not ours to explain
            raise
        raise ActiveRunError(
            distribution_id, active.id, active.action.value, active.state.value
        ) from None
    return run


def get_run(
    session: Session, run_id: str, *, lock: bool = False, with_batch_count: bool = False
) -> Run:
    """The run with this id; ``lock`` takes a row lock (FOR UPDATE) on PostgreSQL;
    ``with_batch_count`` loads :attr:`Run.batch_count` with it (reports)."""
    query = select(Run).where(Run.id == run_id)
    if with_batch_count:
        query = query.options(undefer(Run.batch_count))
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
    query = (
        select(Run)
        .options(undefer(Run.batch_count))
        .order_by(Run.created_at.desc(), Run.id)
        .limit(limit)
    )
    if distribution_id is not None:
        query = query.where(Run.distribution_id == distribution_id)
    return list(session.scalars(query))


def child_run_id(session: Session, run_id: str) -> str | None:
    """The id of the run started by cascading from ``run_id`` (the next stacked one), if any."""
    return session.scalars(select(Run.id).where(Run.parent_run_id == run_id)).first()


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
    # The first batch is sent right after this commits; later ones when their turn comes.
    # Every column with a default is given: SQLAlchemy then runs no default per row (a third
    # of planning 10,000 targets, bench/scale.py).
    session.flush()
    if not any(plan):
        return run
    if _is_postgresql(session):
        # One statement whatever the size: the ids travel as two arrays and PostgreSQL makes
        # the rows (10,000 targets: 1.5 s as an executemany of 70,000 parameters, bench/scale).
        session.execute(
            _PLAN_RESULTS,
            {
                "p_run_id": run.id,
                "p_target_ids": [target_id for batch in plan for target_id in batch],
                "p_batch_indexes": [index for index, batch in enumerate(plan) for _ in batch],
                "p_now": now,
            },
        )
        return run
    # SQLite: one multi-row INSERT through Core, without an ORM object per result (see
    # group_target_ids).
    rows = [
        {
            "id": new_id(),
            "run_id": run.id,
            "target_id": target_id,
            "batch_index": batch_index,
            "status": ResultStatus.PENDING,
            "attempts": 0,
            "sent_at": now if batch_index == 0 else None,
        }
        for batch_index, batch in enumerate(plan)
        for target_id in batch
    ]
    session.execute(insert(RESULTS), rows)
    return run


def _plan_results_statement() -> Insert:
    """PostgreSQL: INSERT ... SELECT FROM unnest(target ids, batch indexes), ids made by
    gen_random_uuid() (the same UUID4 text new_id() makes), batch 0 marked sent now."""
    planned = (
        func.unnest(
            bindparam("p_target_ids", type_=ARRAY(RESULTS.c.target_id.type)),
            bindparam("p_batch_indexes", type_=ARRAY(RESULTS.c.batch_index.type)),
        )
        .table_valued("target_id", "batch_index")
        .render_derived()
    )
    now = typed_param("p_now", RESULTS.c.sent_at)
    return insert(RESULTS).from_select(
        ["id", "run_id", "target_id", "batch_index", "status", "attempts", "sent_at"],
        select(
            cast(func.gen_random_uuid(), RESULTS.c.id.type),
            typed_param("p_run_id", RESULTS.c.run_id),
            planned.c.target_id,
            planned.c.batch_index,
            literal(ResultStatus.PENDING, RESULTS.c.status.type),
            literal(0, RESULTS.c.attempts.type),
            case((planned.c.batch_index == 0, now), else_=null()),
        ),
    )


_PLAN_RESULTS = _plan_results_statement()


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


_FROM_BATCH = typed_param("from_batch", RUNS.c.current_batch)
#: Compare-and-set on the batch index: of concurrent advances exactly one acts.
_ADVANCE = (
    update(RUNS)
    .where(
        RUNS.c.id == bindparam("b_run_id"),
        RUNS.c.state == RunState.RUNNING,
        RUNS.c.current_batch == _FROM_BATCH,
    )
    .values(current_batch=_FROM_BATCH + 1, heartbeat_at=typed_param("now", RUNS.c.heartbeat_at))
)


def advance_batch(session: Session, run_id: str, *, from_batch: int, now: datetime) -> bool:
    """Compare-and-set the run's batch index from ``from_batch`` to the next one.

    Of concurrent advances of one batch exactly one gets True. Rows of ``run`` already loaded
    in this session keep their old ``current_batch``.
    """
    moved = session.execute(_ADVANCE, {"b_run_id": run_id, "from_batch": from_batch, "now": now})
    return int(moved.rowcount) == 1  # type: ignore[attr-defined]


#: The heartbeat, written only when older than ``beat_before``.
_HEARTBEAT = (
    update(RUNS)
    .where(
        RUNS.c.id == bindparam("b_run_id"),
        or_(
            RUNS.c.heartbeat_at.is_(None),
            RUNS.c.heartbeat_at < typed_param("beat_before", RUNS.c.heartbeat_at),
        ),
    )
    .values(heartbeat_at=typed_param("now", RUNS.c.heartbeat_at))
)


def heartbeat(session: Session, run_id: str, *, now: datetime, unless_since: datetime) -> None:
    """Record progress on a running run, unless a heartbeat newer than ``unless_since`` exists.

    Skipping recent heartbeats keeps concurrent messages from queueing on the run row's lock.
    """
    session.execute(_HEARTBEAT, {"b_run_id": run_id, "beat_before": unless_since, "now": now})


#: The heartbeat at PostgreSQL's now(), written only when older than ``every`` by that clock.
_HEARTBEAT_AT_NOW = (
    update(RUNS)
    .where(
        RUNS.c.id == bindparam("b_run_id"),
        or_(
            RUNS.c.heartbeat_at.is_(None),
            RUNS.c.heartbeat_at < func.now() - bindparam("every", type_=Interval()),
        ),
    )
    .values(heartbeat_at=func.now())
)


def heartbeat_now(session: Session, run_id: str, *, every: timedelta) -> None:
    """:func:`heartbeat` at the database's clock, unless one was written within ``every``; on
    PostgreSQL the clock is read inside the UPDATE (no ``SELECT now()`` round trip)."""
    if _is_postgresql(session):
        session.execute(_HEARTBEAT_AT_NOW, {"b_run_id": run_id, "every": every})
        return
    now = database_now(session)
    heartbeat(session, run_id, now=now, unless_since=now - every)


#: The run, its distribution, pinned certificate revision and group variables, in one statement.
_LOAD_RUN = (
    select(Run, Distribution, CertificateRevision, TargetGroup.variables)
    .join(Distribution, Distribution.id == Run.distribution_id)
    .join(CertificateRevision, CertificateRevision.id == Run.certificate_revision_id)
    .outerjoin(TargetGroup, TargetGroup.id == Distribution.group_id)
    .where(Run.id == bindparam("run_id"))
    # Every message loads the run; its batch plan (every target id of the run, ~40 bytes a
    # target) is not needed there and was a JSON parse growing with the run's size.
    .options(defer(Run.batch_plan, raiseload=True))
)


#: The same with PostgreSQL's now() (the transaction's start): the claim that follows needs
#: the database's clock, and asking for it apart was one more round trip per message.
_LOAD_RUN_AT = _LOAD_RUN.add_columns(func.now())


def load_run_context(
    session: Session, run_id: str
) -> tuple[Run, Distribution, CertificateRevision, dict[str, Any]] | None:
    """The run with its distribution, pinned certificate revision and group variables (one
    statement), or None."""
    loaded = load_run_context_at(session, run_id)
    return None if loaded is None else loaded[:4]


def load_run_context_at(
    session: Session, run_id: str
) -> tuple[Run, Distribution, CertificateRevision, dict[str, Any], datetime] | None:
    """:func:`load_run_context` and the database's clock (:func:`database_now`), in the same
    statement on PostgreSQL; None when the run does not exist."""
    if not _is_postgresql(session):
        loaded = session.execute(_LOAD_RUN, {"run_id": run_id}).one_or_none()
        if loaded is None:
            return None
        run, distribution, certificate, variables = loaded
        return run, distribution, certificate, dict(variables or {}), datetime.now(UTC)
    row = session.execute(_LOAD_RUN_AT, {"run_id": run_id}).one_or_none()
    if row is None:
        return None
    run, distribution, certificate, variables, now = row
    return run, distribution, certificate, dict(variables or {}), now.astimezone(UTC)


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def database_now(session: Session) -> datetime:
    """The database's clock: leases, send times and heartbeats are compared on one clock,
    so skew between worker hosts cannot reap live work or delay recovery.

    PostgreSQL's ``now()`` (the transaction's start); SQLite runs inside the worker's own
    process on one host, so its clock is this host's.
    """
    if session.get_bind().dialect.name == "postgresql":
        moment = session.scalar(select(func.now()))
        if isinstance(moment, datetime):
            return moment.astimezone(UTC)
    return datetime.now(UTC)


class RunningRun(NamedTuple):
    """What the reaper needs of a running run."""

    id: str
    current_batch: int
    heartbeat_at: datetime | None


def running_runs(session: Session) -> list[RunningRun]:
    """Every running run (id, current batch, heartbeat), oldest heartbeat first."""
    query = (
        select(Run.id, Run.current_batch, Run.heartbeat_at)
        .where(Run.state == RunState.RUNNING)
        .order_by(Run.heartbeat_at)
    )
    return [RunningRun(*row) for row in session.execute(query)]


def resend_queued_starts(session: Session, *, now: datetime, resend_before: datetime) -> list[str]:
    """Runs still queued whose start was last sent before ``resend_before``: marked re-sent at
    ``now`` (compare-and-set, so one reaper gets each) and returned for the caller to re-send.

    A queued run's heartbeat is when its start was last sent (by the reaper); before that, its
    creation time is.
    """
    last_sent = func.coalesce(Run.heartbeat_at, Run.created_at)
    statement = (
        update(Run)
        .where(Run.state == RunState.QUEUED, last_sent < resend_before)
        .values(heartbeat_at=now)
        .returning(Run.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(session.scalars(statement))


def note_recovery(
    session: Session,
    run_id: str,
    *,
    reason: str,
    now: datetime,
    stale_before: datetime | None = None,
) -> bool:
    """Count one more reaper recovery on the run, with the reason, as progress.

    Conditional: only while the run is still running (a batch callback that finished the run
    meanwhile keeps its reason) and, with ``stale_before``, still stale (of concurrent reapers
    one wins). The counter is incremented in SQL, not read-modify-written.
    """
    count = func.coalesce(Run.options["reaper_recoveries"].as_integer(), 0) + 1
    options: Any
    if session.get_bind().dialect.name == "postgresql":
        options = func.jsonb_set(
            func.coalesce(Run.options, literal_column("'{}'::jsonb")),
            literal_column("'{reaper_recoveries}'::text[]"),
            func.to_jsonb(count),
        )
    else:
        options = func.json_set(func.coalesce(Run.options, "{}"), "$.reaper_recoveries", count)
    statement = (
        update(Run)
        .where(
            Run.id == run_id,
            Run.state == RunState.RUNNING,
            Run.heartbeat_at < stale_before if stale_before is not None else true(),
        )
        .values(options=options, reason=reason, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(statement).rowcount) == 1  # type: ignore[attr-defined]


def recoveries(run: Run) -> int:
    """How many times the reaper resumed this run."""
    return int((run.options or {}).get("reaper_recoveries", 0))
