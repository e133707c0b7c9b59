"""Worker pools on the real environment: two pools, each with its own worker process "in" a
different kube-apiserver (a service-account folder of that cluster, as Kubernetes mounts it,
and the cluster's KUBERNETES_SERVICE_HOST/PORT), against one PostgreSQL and one Redis.

In-cluster targets are the sharp case: which cluster they write to depends on the worker that
takes the message, so the pool decides it, and a worker that runs in another cluster than the
one recorded on the target refuses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from models import ConnectionMode, queries
from models.entities import WorkerHeartbeat
from tasks.distribution import dispatcher
from tests.certfactory import make_chain
from tests.support.pipeline import Pipeline, read_secret
from tests.support.workers import WorkerProcess
from tests.testenv.access import InClusterEnv, ServiceAccountAccess
from tests.testenv.cluster import Cluster
from worker.app import service
from worker.app.pools import silent_pools_of_run
from worker.kube.identity import identity_of_ca

pytestmark = pytest.mark.integration

POOL_A, POOL_B = "pool-a", "pool-b"


@dataclass
class TwoPools:
    """Two clusters, a service-account mount for each, and in-cluster targets of both pools."""

    pipe: Pipeline
    namespace: str
    clusters: dict[str, Cluster]
    """pool -> the cluster its workers run in."""
    mounts: dict[str, InClusterEnv]
    """cluster name -> a pod-like service-account folder and environment of that cluster."""
    targets: dict[str, list[str]]
    """pool -> its targets' names (the Secret name is ``<target>-tls``)."""

    def start_worker(self, name: str, pool: str, cluster: Cluster) -> WorkerProcess:
        """A worker process of ``pool`` running "in" ``cluster``."""
        env = {**self.pipe.env, "CAP_WORKER_POOL": pool, **self.mounts[cluster.name].environ}
        worker = WorkerProcess(name, env, self.pipe.log_dir, concurrency=2)
        self.pipe.workers.append(worker)
        worker.wait_ready()
        return worker

    def add_targets(self, pool: str, count: int) -> list[str]:
        """In-cluster targets of ``pool``, each saved with the health check run on the pool."""
        names = []
        for index in range(count):
            name = f"{self.namespace}-{pool}-{index}"
            _, result = service.create_target(
                self.pipe.runtime,
                service.TargetSpec(
                    name=name,
                    namespace=self.namespace,
                    connection_mode=ConnectionMode.IN_CLUSTER,
                    secret_name=f"{name}-tls",
                    pool=pool,
                ),
                sender=dispatcher,
                check_timeout=90,
            )
            assert result is not None and result.status == "healthy", result
            names.append(name)
        self.targets.setdefault(pool, []).extend(names)
        return names

    def attach_group(self, names: Sequence[str], batch_size: Any) -> str:
        """A group of ``names`` with a certificate attached; the distribution's id."""
        rt = self.pipe.runtime
        chain = make_chain(cn="pools.example.com", fresh_leaf_key=True)
        certificate_id = service.import_certificate(
            rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
        )
        group = f"{self.namespace}-g{uuid.uuid4().hex[:4]}"
        service.create_group(rt, group, list(names), batch_size=batch_size)
        return service.attach(rt, certificate_id, group=group)

    def secret_in(self, admin_api: Any, cluster: Cluster, target: str) -> bool:
        """Whether the target's Secret exists in ``cluster`` (read as cluster admin)."""
        return read_secret(admin_api, cluster, self.namespace, f"{target}-tls") is not None


@pytest.fixture
def two_pools(
    pipe: Pipeline,
    clusters: list[Cluster],
    make_service_account: Callable[..., ServiceAccountAccess],
    in_cluster_env: Callable[[Cluster, str, str], InClusterEnv],
) -> TwoPools:
    namespace = f"pools-{uuid.uuid4().hex[:6]}"
    first, second = clusters[0], clusters[1]
    mounts = {
        cluster.name: in_cluster_env(
            cluster, namespace, make_service_account(cluster, namespace).token
        )
        for cluster in (first, second)
    }
    return TwoPools(pipe, namespace, {POOL_A: first, POOL_B: second}, mounts, {})


def _identity(target: str, rt: Any) -> str | None:
    with rt.session() as session:
        return queries.get_target_by_name(session, target).cluster_identity


def test_a_group_spanning_two_pools_writes_every_in_cluster_secret_into_its_own_cluster(
    two_pools: TwoPools, testenv_admin_api: Any
) -> None:
    pools = two_pools
    cluster_a, cluster_b = pools.clusters[POOL_A], pools.clusters[POOL_B]
    pools.start_worker("a1", POOL_A, cluster_a)
    pools.start_worker("b1", POOL_B, cluster_b)
    in_a, in_b = pools.add_targets(POOL_A, 3), pools.add_targets(POOL_B, 3)
    # The health check at save ran on each target's pool and recorded the cluster it saw.
    for name in in_a:
        assert _identity(name, pools.pipe.runtime) == identity_of_ca(cluster_a.ca_pem.encode())
    for name in in_b:
        assert _identity(name, pools.pipe.runtime) == identity_of_ca(cluster_b.ca_pem.encode())
    # Interleaved, in batches of two: every batch spans both pools.
    interleaved = [name for pair in zip(in_a, in_b, strict=True) for name in pair]
    distribution = pools.attach_group(interleaved, batch_size=2)

    report = pools.pipe.wait(pools.pipe.enqueue(distribution, "execute"))

    assert report.state == "succeeded", report
    assert report.batches == 3
    assert {result.status for result in report.results} == {"created"}
    for name in in_a:
        assert pools.secret_in(testenv_admin_api, cluster_a, name), name
        assert not pools.secret_in(testenv_admin_api, cluster_b, name), name
    for name in in_b:
        assert pools.secret_in(testenv_admin_api, cluster_b, name), name
        assert not pools.secret_in(testenv_admin_api, cluster_a, name), name


def test_a_worker_whose_service_account_belongs_to_another_cluster_refuses(
    two_pools: TwoPools, testenv_admin_api: Any
) -> None:
    pools = two_pools
    cluster_a, cluster_b = pools.clusters[POOL_A], pools.clusters[POOL_B]
    rightful = pools.start_worker("a1", POOL_A, cluster_a)
    (name,) = pools.add_targets(POOL_A, 1)
    expected = identity_of_ca(cluster_a.ca_pem.encode())
    assert _identity(name, pools.pipe.runtime) == expected
    # Pool A's worker is replaced by one deployed into the wrong cluster (B's mount).
    rightful.stop()
    pools.start_worker("misplaced", POOL_A, cluster_b)
    distribution = pools.attach_group([name], batch_size=1)

    report = pools.pipe.wait(pools.pipe.enqueue(distribution, "execute"))

    # Its only target failed: the run halts (failure threshold 0), nothing written.
    assert report.state == "halted", report
    (result,) = report.results
    assert result.status == "failed"
    assert result.error_reason == "wrong_cluster"
    seen = identity_of_ca(cluster_b.ca_pem.encode())
    message = result.error_message or ""
    assert expected[:26] in message and seen[:26] in message, message
    assert "CAP_WORKER_POOL" in message and "pool-a" in message
    # Nothing was written anywhere, and the recorded identity is still cluster A's.
    assert not pools.secret_in(testenv_admin_api, cluster_b, name)
    assert not pools.secret_in(testenv_admin_api, cluster_a, name)
    assert _identity(name, pools.pipe.runtime) == expected
    # The health check from the misplaced worker says the same.
    checked = service.check_target_health_in_pool(
        pools.pipe.runtime, result.target_id, sender=dispatcher, timeout=60
    )
    assert checked.status == "unhealthy"
    assert seen[:26] in checked.message and expected[:26] in checked.message


def _cli(pipe: Pipeline, *args: str) -> str:
    command = [str(Path(sys.executable).with_name("certautopilot")), *args]
    done = subprocess.run(
        command,
        env={**os.environ, **pipe.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_pool_without_workers_leaves_its_targets_pending_with_the_reason_until_it_returns(
    two_pools: TwoPools, testenv_admin_api: Any, redis_url: str
) -> None:
    pools = two_pools
    pipe = pools.pipe
    cluster_a, cluster_b = pools.clusters[POOL_A], pools.clusters[POOL_B]
    pools.start_worker("a1", POOL_A, cluster_a)
    worker_b = pools.start_worker("b1", POOL_B, cluster_b)
    in_a, in_b = pools.add_targets(POOL_A, 2), pools.add_targets(POOL_B, 2)
    # Killed (a node lost): its heartbeat row stays and ages out; a clean stop is below.
    worker_b.kill()
    distribution = pools.attach_group([*in_a, *in_b], batch_size="100%")

    run_id = pipe.enqueue(distribution, "execute")

    # Pool A finishes its targets; pool B's wait. Once pool B has been silent past its window
    # and the run past the stale window, the reaper says why on the run and re-sends nothing.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        report = service.run_report(pipe.runtime, run_id)
        if "waiting" in (report.reason or ""):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the run never said it waits: {report}\n{pipe.logs()[-3000:]}")
    assert report.state == "running"
    statuses = {result.target_name: result.status for result in report.results}
    assert {statuses[name] for name in in_a} == {"created"}
    assert {statuses[name] for name in in_b} == {"pending"}
    assert "pool 'pool-b': 2 target(s) pending" in (report.reason or "")
    assert "CAP_WORKER_POOL=pool-b" in (report.reason or "")
    (silent,) = silent_pools_of_run(pipe.runtime, run_id)
    assert silent.pool == POOL_B and silent.open_targets == 2
    assert silent.silent_for is not None and silent.silent_for > 5
    shown = _cli(pipe, "runs", "show", run_id)
    assert "waiting:" in shown and "pool 'pool-b': 2 target(s) pending" in shown, shown
    assert "no worker of this pool seen for" in shown
    # Several reaper passes later, pool B's queue still holds only the messages of the first
    # dispatch (one per target at this size): nothing was re-sent into it.
    time.sleep(8)
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen("kubernetes.pool-b") == 2
    assert service.run_report(pipe.runtime, run_id).state == "running"

    worker_b2 = pools.start_worker("b2", POOL_B, cluster_b)
    report = pipe.wait(run_id, timeout=120)

    assert report.state == "succeeded", report
    for name in in_b:
        assert pools.secret_in(testenv_admin_api, cluster_b, name), name
        assert not pools.secret_in(testenv_admin_api, cluster_a, name), name
    assert silent_pools_of_run(pipe.runtime, run_id) == []

    # A warm shutdown (SIGTERM) removes the worker's heartbeat row at once, so a pool whose
    # last worker stopped is named in `runs show` without waiting for the row to age out.
    def pool_b_workers() -> set[str]:
        with pipe.runtime.session() as session:
            rows = session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.pool == POOL_B))
            return {row.worker.split("@")[0] for row in rows}

    assert pool_b_workers() == {"b1", "b2"}
    worker_b2.stop()
    assert pool_b_workers() == {"b1"}
