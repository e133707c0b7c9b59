"""Worker pools over the database (SQLite): the schema revision, heartbeats, the recorded
cluster identity, the reaper's hold-back of pools with no live worker, and the health check
sent to another pool. The dispatcher here is a recorder (pure unit tests); the real pipeline
with two pools is tests/integration/test_pools.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from models import ConnectionMode, Target, queries
from models.sealing import Sealer
from tests.certfactory import make_chain
from tests.unit.test_models_sqlite import (
    KEK1,
    NOW,
    PREVIOUS,
    TABLES,
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
from worker.app import commands
from worker.app.pools import check_cluster, silent_pools_of_run
from worker.app.runs import reap
from worker.core.bundle import TlsBundle
from worker.core.names import DEFAULT_SECRET_NAME_TEMPLATE
from worker.kube.errors import InClusterUnavailable
from worker.kube.identity import WrongCluster, identity_of_ca
from worker.platform.db import session_scope
from worker.platform.runtime import Runtime, build_runtime
from worker.platform.settings import load_settings

__all__ = ["bundle", "db_url", "engine", "factory", "sealer"]  # fixtures, imported for use here

# ------------------------------------------------------------------------------ migration


def test_a_database_filled_before_the_pools_revision_upgrades_with_every_row_intact(
    factory: sessionmaker[Session], engine: Engine, sealer: Sealer, bundle: TlsBundle, db_url: str
) -> None:
    # Read from the migration, so re-chaining it onto another revision keeps this test true.
    migration = migration_module("0005_worker_pools.py")
    before_pools, pools = migration.down_revision, migration.revision
    with session_scope(factory) as session:
        distribution, target = _distribution(session, sealer, bundle)
        ids: dict[str, Any] = {"distribution_id": distribution.id, "target_id": target.id}
        assert _save(session, sealer, PREVIOUS, **ids)
        _started_run(session, distribution, [[target.id]])
        target_id = target.id
    downgrade(db_url, before_pools)
    assert current(db_url) == before_pools
    assert "worker_heartbeats" not in inspect(engine).get_table_names()
    columns_before = _columns(engine)
    rows_before = _all_rows(engine, columns_before)
    assert all(rows_before[table] for table in ("targets", "runs", "target_results"))

    upgrade(db_url, pools)

    assert current(db_url) == pools
    # Every column that existed still holds exactly what it held.
    assert _all_rows(engine, columns_before) == rows_before
    assert set(TABLES) <= set(inspect(engine).get_table_names())
    # The models are head's: later revisions add columns they read.
    upgrade(db_url)
    with session_scope(factory) as session:
        # An existing target is in the default pool with no cluster recorded yet.
        # The revision's columns only: later revisions add columns this schema does not have.
        stored = session.execute(
            select(Target.pool, Target.cluster_identity).where(Target.id == target_id)
        ).one()
        assert tuple(stored) == ("default", None)
        assert queries.last_seen_by_pool(session) == {}
        queries.record_worker_heartbeat(session, "w1", "default", now=NOW)
    # And back: the downgrade drops what the revision added and keeps the rest.
    downgrade(db_url, before_pools)
    assert _all_rows(engine, columns_before) == rows_before


# ----------------------------------------------------------------------------- heartbeats


def test_a_heartbeat_is_one_row_per_worker_and_the_pool_keeps_the_latest(
    factory: sessionmaker[Session],
) -> None:
    with session_scope(factory) as session:
        queries.record_worker_heartbeat(session, "w1", "eu", now=NOW)
        queries.record_worker_heartbeat(session, "w1", "eu", now=NOW + timedelta(seconds=15))
        queries.record_worker_heartbeat(session, "w2", "eu", now=NOW + timedelta(seconds=5))
        queries.record_worker_heartbeat(session, "w3", "us", now=NOW - timedelta(days=8))
    with session_scope(factory) as session:
        assert queries.last_seen_by_pool(session) == {
            "eu": NOW + timedelta(seconds=15),
            "us": NOW - timedelta(days=8),
        }
        assert queries.last_seen_by_pool(session, ["us"]) == {"us": NOW - timedelta(days=8)}
        assert queries.forget_workers_before(session, NOW - timedelta(days=7)) == 1
        assert set(queries.last_seen_by_pool(session)) == {"eu"}


def test_a_cluster_identity_is_recorded_once_unless_replaced(
    factory: sessionmaker[Session], sealer: Sealer
) -> None:
    with session_scope(factory) as session:
        target = _in_cluster_target(session, "edge", pool="eu")
        assert queries.pin_cluster_identity(session, target.id, "ca-sha256:aa") == "ca-sha256:aa"
        assert queries.pin_cluster_identity(session, target.id, "ca-sha256:bb") == "ca-sha256:aa"
        assert (
            queries.pin_cluster_identity(session, target.id, "ca-sha256:bb", replace=True)
            == "ca-sha256:bb"
        )
        assert queries.target_pools(session, [target.id, "missing"]) == {target.id: "eu"}


def _in_cluster_target(session: Session, name: str, *, pool: str) -> Target:
    return queries.create_target(
        session,
        name=name,
        connection_mode=ConnectionMode.IN_CLUSTER,
        namespace_template="ingress",
        secret_name_template=DEFAULT_SECRET_NAME_TEMPLATE,
        pool=pool,
    )


# -------------------------------------------------------------------------- app: runtime


def _runtime(db_url: str, tmp_path: Path, **extra: str) -> Runtime:
    return build_runtime(
        load_settings(
            {
                "HOME": str(tmp_path),
                "CAP_DATA_DIR": str(tmp_path / "data"),
                "CAP_DATABASE_URL": db_url,
                "CAP_KEK": "k1:" + base64.b64encode(KEK1).decode(),
                "CAP_STALE_AFTER": "60",
                "CAP_REAPER_INTERVAL": "15",
                **extra,
            }
        )
    )


@pytest.fixture
def runtime(db_url: str, tmp_path: Path) -> Iterator[Runtime]:
    rt = _runtime(db_url, tmp_path)
    yield rt
    rt.close()


class Recorder:
    """A Dispatcher and HealthSender that records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def start(self, run_id: str) -> None:
        self.sent.append(("start", (run_id,)))

    def process_targets(self, run_id: str, target_ids: Sequence[str]) -> None:
        self.sent.append(("process", (run_id, tuple(target_ids))))

    def advance(self, run_id: str, batch_index: int) -> None:
        self.sent.append(("advance", (run_id, batch_index)))

    def check_health(self, target_id: str, pool: str, *, record_cluster: bool) -> None:
        self.sent.append(("health", (target_id, pool, record_cluster)))


def test_a_worker_records_the_cluster_first_and_refuses_another_one(
    db_url: str, tmp_path: Path
) -> None:
    mounts = {}
    for cluster in ("a", "b"):
        folder = tmp_path / f"sa-{cluster}"
        folder.mkdir()
        (folder / "ca.crt").write_bytes(make_chain(cn=f"{cluster}.example").root_pem)
        mounts[cluster] = folder
    in_a = _runtime(db_url, tmp_path, CAP_SERVICEACCOUNT_DIR=str(mounts["a"]))
    in_b = _runtime(db_url, tmp_path, CAP_SERVICEACCOUNT_DIR=str(mounts["b"]))
    try:
        with in_a.session() as session:
            target_id = _in_cluster_target(session, "edge", pool="eu").id
        with in_a.session() as session:
            target = queries.get_target(session, target_id)
        check_cluster(in_a, target)  # first: records cluster a
        with in_a.session() as session:
            target = queries.get_target(session, target_id)
        expected = identity_of_ca((mounts["a"] / "ca.crt").read_bytes())
        assert target.cluster_identity == expected
        check_cluster(in_a, target)  # the same cluster again: fine
        with pytest.raises(WrongCluster, match="runs in the cluster ca-sha256:"):
            check_cluster(in_b, target)
        # A stale in-memory target (claimed before the pin) is still judged by the database.
        target.cluster_identity = None
        with pytest.raises(WrongCluster):
            check_cluster(in_b, target)
    finally:
        in_a.close()
        in_b.close()


# ----------------------------------------------------------------------------- the reaper


def _run_over_pools(rt: Runtime, sealer: Sealer, bundle: TlsBundle) -> tuple[str, dict[str, str]]:
    """A running run (started at NOW) over one target in pool "a" and two in pool "b"."""
    with rt.session() as session:
        credential = queries.store_credential(session, sealer, "kc", "kubeconfig", b"x: y\n")
        targets = {}
        for name, pool in (("ta", "a"), ("tb1", "b"), ("tb2", "b")):
            targets[name] = queries.create_target(
                session,
                name=name,
                connection_mode="kubeconfig",
                credential_id=credential.id,
                namespace_template="ingress",
                secret_name_template=DEFAULT_SECRET_NAME_TEMPLATE,
                pool=pool,
            ).id
        certificate = queries.store_certificate(session, sealer, bundle)
        group = queries.create_group(session, name="g", target_ids=list(targets.values()))
        distribution = queries.create_distribution(
            session, certificate_id=certificate.id, group_id=group.id
        )
        run = queries.create_run(session, distribution_id=distribution.id, action="execute")
        queries.start_run(session, run.id, batch_plan=[list(targets.values())], now=NOW)
        return run.id, targets


def test_the_reaper_re_sends_only_to_pools_with_a_live_worker_and_says_which_wait(
    runtime: Runtime, sealer: Sealer, bundle: TlsBundle
) -> None:
    rt = runtime
    run_id, targets = _run_over_pools(rt, sealer, bundle)
    # Each pass comes once the targets' last send is older than CAP_RESEND_AFTER (300 s).
    overdue = timedelta(seconds=rt.settings.tasks.resend_after + 100)
    later = NOW + overdue
    with rt.session() as session:  # pool a is live; pool b never had a worker
        queries.record_worker_heartbeat(session, "wa", "a", now=later - timedelta(seconds=5))
    sent = Recorder()

    reap(rt, sent, now=later)

    assert sent.sent == [("process", (run_id, (targets["ta"],)))]
    with rt.session() as session:
        run = queries.get_run(session, run_id)
        assert "re-sent 1 target(s)" in (run.reason or "")
        assert "; not re-sent: pool 'b': 2 target(s) pending" in (run.reason or "")
        assert "no live worker of this pool" in (run.reason or "")
        assert queries.recoveries(run) == 1
        # Pool a's target is done; only pool b's wait.
        queries.skip_pending_results(session, run_id, from_batch=0, reason="x", now=later)
    with rt.session() as session:
        _reopen(session, run_id, [targets["tb1"], targets["tb2"]])
    (silent,) = silent_pools_of_run(rt, run_id, now=later)
    assert (silent.pool, silent.open_targets, silent.silent_for) == ("b", 2, None)

    # Only pool b is left: nothing is re-sent, the run says why, no recovery is counted.
    again = later + overdue
    sent = Recorder()
    reap(rt, sent, now=again)
    assert sent.sent == []
    with rt.session() as session:
        run = queries.get_run(session, run_id)
        assert (run.reason or "").startswith("waiting at ")
        assert "nothing re-sent: pool 'b': 2 target(s) pending" in (run.reason or "")
        assert "CAP_WORKER_POOL=b" in (run.reason or "")
        assert queries.recoveries(run) == 1
        assert run.heartbeat_at == again  # looked at again after another stale window

    # A worker of pool b appears: the next stale pass re-sends its targets.
    resumed = again + overdue
    with rt.session() as session:
        queries.record_worker_heartbeat(session, "wb", "b", now=resumed - timedelta(seconds=1))
    sent = Recorder()
    reap(rt, sent, now=resumed)
    # The reaper re-sends lost targets in id order.
    assert sent.sent == [("process", (run_id, tuple(sorted((targets["tb1"], targets["tb2"])))))]
    assert silent_pools_of_run(rt, run_id, now=resumed) == []


def _reopen(session: Session, run_id: str, target_ids: list[str]) -> None:
    from sqlalchemy import update

    from models import ResultStatus, TargetResult

    session.execute(
        update(TargetResult)
        .where(TargetResult.run_id == run_id, TargetResult.target_id.in_(target_ids))
        .values(status=ResultStatus.PENDING, error_reason=None, finished_at=None)
    )


# ------------------------------------------------------------------- health check in a pool


def test_a_health_check_of_another_pool_that_no_worker_answers_says_so(
    runtime: Runtime, sealer: Sealer
) -> None:
    with runtime.session() as session:
        target_id = _in_cluster_target(session, "edge", pool="eu").id
        queries.record_worker_heartbeat(session, "w-eu", "eu", now=NOW)
    sent = Recorder()

    result = commands.check_target_health_in_pool(runtime, target_id, sender=sent, timeout=0.3)

    assert sent.sent == [("health", (target_id, "eu", False))]
    assert result.status == "unknown"
    assert "no worker of pool 'eu' answered the health check within 0.3s" in result.message
    assert "a worker of that pool was last seen" in result.message
    assert "CAP_WORKER_POOL=eu" in result.message
    assert "certautopilot targets check edge" in result.message
    with runtime.session() as session:  # nothing recorded on the target
        assert queries.get_target(session, target_id).health_checked_at is None


def test_saving_an_in_cluster_target_of_another_pool_needs_no_local_service_account(
    runtime: Runtime,
) -> None:
    # This process is not in Kubernetes; the target's pool is: the save is accepted and the
    # check goes to that pool.
    sent = Recorder()
    spec = commands.TargetSpec(
        name="edge",
        namespace="ingress",
        connection_mode=ConnectionMode.IN_CLUSTER,
        pool="eu",
    )
    target_id, result = commands.create_target(runtime, spec, sender=sent, check_timeout=0.2)
    assert sent.sent == [("health", (target_id, "eu", False))]
    assert result is not None and result.status == "unknown"
    # In this process's own pool the local rule still holds.
    with pytest.raises(InClusterUnavailable, match="save it with --pool naming the worker pool"):
        commands.create_target(
            runtime,
            commands.TargetSpec(
                name="here", namespace="ingress", connection_mode=ConnectionMode.IN_CLUSTER
            ),
            sender=sent,
        )


def test_a_bad_pool_name_is_refused_and_nothing_is_saved(runtime: Runtime) -> None:
    spec = commands.TargetSpec(
        name="edge", namespace="ingress", connection_mode=ConnectionMode.IN_CLUSTER, pool="EU"
    )
    with pytest.raises(commands.ServiceError, match="target 'edge': pool 'EU' is not a valid"):
        commands.create_target(runtime, spec, sender=Recorder())
    with runtime.session() as session:
        assert queries.list_targets(session) == []
