"""The paths around a large run issue a fixed number of SQL statements, whatever its size.

Planning a run, the failure-threshold decision after a batch, the reaper's pass, `runs show`
(whole, a page, and streamed), `runs list` and `groups show` are each run over the same kind of
fleet at two sizes; the statements each sends must not grow with the number of targets (no
N+1). Times are not asserted: bench/scale.py measures those on PostgreSQL. The schema revision
that adds the indexes these scans use is checked here too (rows intact across it).

tests/integration/test_models_postgres.py runs these again on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine, inspect, update
from sqlalchemy.orm import Session, sessionmaker

from models import ResultStatus, TargetResult, queries
from models.sealing import Sealer
from tests.support.statements import counted
from tests.unit.test_models_sqlite import (
    NOW,
    PREVIOUS,
    _all_rows,
    _columns,
    _distribution,
    _save,
    _started_run,
    bundle,
    current,
    db_url,
    downgrade,
    engine,
    factory,
    migration_module,
    sealer,
    upgrade,
)
from tests.unit.test_pools_models import Recorder, _runtime
from worker.app import views
from worker.app.pools import silent_pools_of_run
from worker.app.runs import advance_run, reap, start_run
from worker.core.bundle import TlsBundle
from worker.core.names import DEFAULT_SECRET_NAME_TEMPLATE
from worker.platform.db import session_scope
from worker.platform.runtime import Runtime

__all__ = ["bundle", "db_url", "engine", "factory", "sealer"]  # fixtures, imported for use here

SIZES = (4, 40)


@pytest.fixture
def runtime(db_url: str, tmp_path: Path) -> Iterator[Runtime]:
    rt = _runtime(db_url, tmp_path)
    yield rt
    rt.close()


def _fleet(rt: Runtime, sealer: Sealer, bundle: TlsBundle, n: int) -> tuple[str, str]:
    """``n`` targets in a group of two batches (failures tolerated up to half), attached, and a
    queued execute run of it: (run id, group name)."""
    group_name = f"fleet-{n}"
    with rt.session() as session:
        credential = queries.store_credential(session, sealer, f"kc-{n}", "kubeconfig", b"x: y\n")
        target_ids = [
            queries.create_target(
                session,
                name=f"t{n}-{index:03d}",
                connection_mode="kubeconfig",
                credential_id=credential.id,
                namespace_template="ingress",
                secret_name_template=DEFAULT_SECRET_NAME_TEMPLATE,
            ).id
            for index in range(n)
        ]
        certificate = queries.store_certificate(session, sealer, bundle)
        group = queries.create_group(
            session,
            name=group_name,
            target_ids=target_ids,
            batch_size="50%",
            failure_threshold="50%",
        )
        distribution = queries.create_distribution(
            session, certificate_id=certificate.id, group_id=group.id
        )
        run = queries.create_run(session, distribution_id=distribution.id, action="execute")
        return run.id, group_name


def _finish_batch(rt: Runtime, run_id: str, batch_index: int) -> None:
    """Every target of the batch recorded: one failed, the others created."""
    with rt.session() as session:
        session.execute(
            update(TargetResult)
            .where(TargetResult.run_id == run_id, TargetResult.batch_index == batch_index)
            .values(status=ResultStatus.CREATED, finished_at=NOW, duration_ms=5)
        )
        first = queries.list_target_results(session, run_id, batch_index=batch_index)[0]
        session.execute(
            update(TargetResult)
            .where(TargetResult.id == first.id)
            .values(status=ResultStatus.FAILED, error_reason="Forbidden")
        )


def _statements_per_path(rt: Runtime, sealer: Sealer, bundle: TlsBundle, n: int) -> dict[str, int]:
    run_id, group_name = _fleet(rt, sealer, bundle, n)
    sent = Recorder()
    with rt.session() as session:
        # Batch 2 is sent (by the decision) at the database's now: the reaper looks later.
        overdue = queries.database_now(session) + timedelta(
            seconds=rt.settings.tasks.resend_after + 1
        )
    paths: dict[str, Callable[[], object]] = {
        "plan": lambda: start_run(rt, sent, run_id),
        "failure-threshold decision": lambda: advance_run(rt, sent, run_id, 0),
        "reaper pass": lambda: reap(rt, sent, now=overdue),
        "runs show": lambda: (views.run_report(rt, run_id), silent_pools_of_run(rt, run_id)),
        "runs show, a page": lambda: views.run_report(rt, run_id, offset=1, limit=2),
        "runs show, streamed": lambda: list(views.stream_run_results(rt, run_id)),
        "runs list": lambda: views.list_runs(rt),
        "groups show": lambda: views.get_group(rt, group_name),
    }
    counts = {}
    for name, path in paths.items():
        if name == "failure-threshold decision":
            _finish_batch(rt, run_id, 0)  # recorded by the workers, not part of the decision
        if name == "reaper pass":
            with rt.session() as session:  # a live worker: the lost targets are re-sent
                queries.record_worker_heartbeat(session, "w1", "default", now=overdue)
        with counted(rt.engine) as seen:
            path()
        counts[name] = seen["statements"]
    # The paths did their work at this size (not a count of nothing).
    report = views.run_report(rt, run_id)
    assert report.target_count == n and len(report.results) == n
    assert report.counts()["failed"] == 1 and report.current_batch == 1
    assert len(views.run_report(rt, run_id, offset=1, limit=2).results) == 2
    assert ("advance", (run_id, 0)) not in sent.sent  # the decision ran in advance_run itself
    process = [args for kind, args in sent.sent if kind == "process"]
    assert [len(ids) for _, ids in process] == [n // 2, n // 2, n // 2]  # plan, batch 2, reaper
    assert len(views.get_group(rt, group_name).targets) == n
    return counts


def test_large_run_paths_send_the_same_statements_whatever_the_run_size(
    tmp_path: Path, sealer: Sealer, bundle: TlsBundle
) -> None:
    counts = []
    for n in SIZES:  # a database each: the same other rows around each size
        url = f"sqlite:///{tmp_path}/fleet-{n}.db"
        upgrade(url)
        rt = _runtime(url, tmp_path / f"n{n}")
        try:
            counts.append(_statements_per_path(rt, sealer, bundle, n))
        finally:
            rt.close()
    small, large = counts

    assert large == small
    assert all(count > 0 for count in small.values())


def test_runs_list_reads_counts_not_rows_and_the_rows_on_request(
    runtime: Runtime, sealer: Sealer, bundle: TlsBundle
) -> None:
    run_id, _ = _fleet(runtime, sealer, bundle, 6)
    start_run(runtime, Recorder(), run_id)
    _finish_batch(runtime, run_id, 0)

    (listed,) = views.list_runs(runtime)
    (full,) = views.list_runs(runtime, with_results=True)

    assert listed.results == () and listed.counts() == {"created": 2, "failed": 1, "pending": 3}
    assert listed.target_count == 6
    assert full.counts() == listed.counts() and len(full.results) == 6
    assert full.results == views.run_report(runtime, run_id).results
    assert tuple(views.stream_run_results(runtime, run_id)) == full.results
    page = views.run_report(runtime, run_id, offset=4, limit=10)
    assert page.results == full.results[4:] and page.results_offset == 4
    assert views.run_report(runtime, run_id, limit=0).results == ()
    with pytest.raises(ValueError, match="offset >= 0"):
        views.run_report(runtime, run_id, offset=-1)


# ------------------------------------------------------------------------------- migration


def _migration() -> ModuleType:
    return migration_module("0009_scan_indexes.py")


def _indexes(engine: Engine, table: str) -> set[str]:
    return {str(index["name"]) for index in inspect(engine).get_indexes(table)}


def test_a_database_filled_before_the_scan_indexes_upgrades_with_every_row_intact(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer, bundle: TlsBundle, db_url: str
) -> None:
    # Read from the migration, so re-chaining it onto another revision keeps this test true.
    migration = _migration()
    before, revision = migration.down_revision, migration.revision
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        assert _save(
            session, sealer, PREVIOUS, distribution_id=distribution.id, target_id=target.id
        )
        _started_run(session, distribution, [[target.id]])
    downgrade(db_url, before)
    assert current(db_url) == before
    assert "ix_target_results_open" not in _indexes(engine, "target_results")
    columns_before = _columns(engine)
    rows_before = _all_rows(engine, columns_before)
    assert all(rows_before[table] for table in ("targets", "runs", "target_results"))

    upgrade(db_url, revision)

    assert current(db_url) == revision
    assert _all_rows(engine, columns_before) == rows_before
    assert "ix_target_results_open" in _indexes(engine, "target_results")
    assert {"ix_runs_created_at", "ix_runs_distribution_id_created_at"} <= _indexes(engine, "runs")
    downgrade(db_url, before)
    assert _all_rows(engine, columns_before) == rows_before
    assert "ix_runs_created_at" not in _indexes(engine, "runs")
