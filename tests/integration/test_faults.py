"""Faults with real processes: workers killed and stopped, Redis and PostgreSQL going away,
apiservers stopping or throttling, concurrent writers and duplicate runs.

Every test ends with the same truth check (:func:`_assert_truthful`): the run is final;
every target reported written holds exactly the new certificate; every other target still
holds its previous Secret; no rollback snapshot holds our own new content.

One pipeline is shared by the module (its database is reached through a :class:`TcpGate`
so PostgreSQL can be cut, its broker is a private Redis with appendonly so it can be
restarted); each test starts and stops its own workers.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from kubernetes import client as k8s

from models import queries
from tasks.distribution import dispatcher
from tests.certfactory import Chain
from tests.support.faults import (
    FaultyApiProxy,
    TcpGate,
    build_faulty_fleet,
    seed_previous_secrets,
)
from tests.support.pipeline import Fleet, Pipeline, pipeline, read_secret
from worker.app import service
from worker.app.runs import DATABASE_OUTAGE_ERRORS
from worker.platform.celery_app import app, configure
from worker.platform.runtime import set_runtime

WRITTEN = {"created", "updated", "unchanged"}



# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gated_postgres(testenv: Any) -> Iterator[tuple[str, TcpGate]]:
    """A fresh database reached through a gate that a test may cut."""
    server = testenv.postgres()
    url = server.create_database("faults")
    parts = urlsplit(url)
    gate = TcpGate("127.0.0.1", int(parts.port or 5432))
    gated = url.replace(f":{parts.port}/", f":{gate.port}/")
    yield gated, gate
    gate.close()
    server.drop_database(url)


@pytest.fixture(scope="module")
def persistent_redis(make_redis_server: Callable[..., Any]) -> Any:
    """A private Redis with appendonly (fsync always), so a restart keeps what it acknowledged."""
    return make_redis_server(appendonly=True)


@pytest.fixture(scope="module")
def shared(
    gated_postgres: tuple[str, TcpGate], persistent_redis: Any, tmp_path_factory: Any
) -> Iterator[Pipeline]:
    with pipeline(
        gated_postgres[0], persistent_redis.url, tmp_path_factory.mktemp("faults")
    ) as made:
        yield made


@pytest.fixture
def pipe(shared: Pipeline) -> Iterator[Pipeline]:
    """The shared pipeline; workers a test starts are stopped when it ends."""
    before = len(shared.workers)
    yield shared
    for worker in shared.workers[before:]:
        worker.stop(timeout=20)


@pytest.fixture
def proxies(clusters: list[Any]) -> Iterator[Callable[[Any], FaultyApiProxy]]:
    made: list[FaultyApiProxy] = []

    def make(cluster: Any) -> FaultyApiProxy:
        proxy = FaultyApiProxy(cluster.server, cluster.ca_pem)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@dataclass
class Scene:
    """A fleet whose Secrets hold an older key, maybe behind a fault proxy."""

    pipe: Pipeline
    fleet: Fleet
    previous: Chain
    proxy: FaultyApiProxy | None
    admin_api: Any

    def truthful(self, report: service.RunReport) -> dict[str, int]:
        """:func:`_assert_truthful` for this scene; returns the run's counts."""
        return _assert_truthful(self.pipe, report, self.fleet, self.admin_api, self.previous)


Stage = Callable[..., Scene]


@pytest.fixture
def stage(
    pipe: Pipeline,
    clusters: list[Any],
    make_service_account: Any,
    testenv_admin_api: Any,
    proxies: Callable[[Any], FaultyApiProxy],
) -> Stage:
    """Factory: ``stage(prefix, targets=N, clusters=1, proxy=True, latency=0.0, gate=None,
    **fleet_options)``; the proxy and the gate stand in front of the first cluster."""

    def make(
        prefix: str,
        *,
        targets: int,
        clusters: int = 1,
        proxy: bool = True,
        latency: float = 0.0,
        gate: TcpGate | None = None,
        **options: Any,
    ) -> Scene:
        used = all_clusters[:clusters]
        faulty = proxies(used[0]) if proxy else None
        if faulty is not None:
            faulty.latency = latency
        fleet = _fleet(
            pipe,
            used,
            make_service_account,
            prefix,
            targets=targets,
            proxy_for={used[0].name: faulty} if faulty is not None else None,
            gate_for={used[0].name: gate} if gate is not None else None,
            **options,
        )
        previous = _seed_previous(fleet, testenv_admin_api)
        return Scene(pipe, fleet, previous, faulty, testenv_admin_api)

    all_clusters = clusters
    return make


# ------------------------------------------------------------------------------ helpers


def _namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _fleet(
    pipe: Pipeline,
    clusters: list[Any],
    make_service_account: Any,
    prefix: str,
    **options: Any,
) -> Fleet:
    """A faulty fleet in a fresh namespace named after ``prefix``."""
    return build_faulty_fleet(pipe, clusters, make_service_account, _namespace(prefix), **options)


def _seed_previous(fleet: Fleet, admin_api: Any) -> Chain:
    """Every target's Secret exists already, written by this distribution with an older key."""
    return seed_previous_secrets(admin_api, fleet.placement.values(), fleet.distribution_id)


def _report(pipe: Pipeline, run_id: str) -> service.RunReport | None:
    """The run's report, or None while the database is unreachable."""
    try:
        return service.run_report(pipe.runtime, run_id)
    except DATABASE_OUTAGE_ERRORS:
        return None


def _wait_final(pipe: Pipeline, run_id: str, timeout: float = 120.0) -> service.RunReport:
    deadline = time.monotonic() + timeout
    report = None
    while time.monotonic() < deadline:
        report = _report(pipe, run_id)
        if report is not None and report.finished:
            return report
        time.sleep(0.2)
    tail = "\n".join(w.log_text()[-2500:] for w in pipe.workers[-3:])
    raise AssertionError(f"run {run_id} not final after {timeout}s: {report}\n{tail}")


def _wait_tasks_succeeded(worker: Any, task_ids: list[str], timeout: float = 60.0) -> None:
    """Block until the worker logged every task as succeeded (Celery's trace line at INFO)."""
    deadline = time.monotonic() + timeout
    missing = list(task_ids)
    while time.monotonic() < deadline:
        log = worker.log_text()
        missing = [task_id for task_id in task_ids if f"[{task_id}] succeeded" not in log]
        if not missing:
            return
        time.sleep(0.1)
    tail = worker.log_text()[-3000:]
    raise AssertionError(f"tasks {missing} did not succeed in {timeout}s:\n{tail}")


def _wait_done(pipe: Pipeline, run_id: str, at_least: int, timeout: float = 60.0) -> None:
    """Block until ``at_least`` targets of the run reached a final status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = _report(pipe, run_id)
        if report is not None:
            done = sum(1 for r in report.results if r.status not in ("pending", "running"))
            if done >= at_least or report.finished:
                return
        time.sleep(0.05)
    raise AssertionError(f"run {run_id}: fewer than {at_least} targets done after {timeout}s")


def _wait_in_flight(pipe: Pipeline, run_id: str, timeout: float = 30.0) -> set[str]:
    """Block until some targets of the run are being processed; return their ids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = service.run_report(pipe.runtime, run_id)
        running = {r.target_id for r in report.results if r.status == "running"}
        if running:
            return running
        time.sleep(0.02)
    raise AssertionError(f"no target of run {run_id} was in flight within {timeout}s")


def _key_of(secret: Any) -> bytes | None:
    return None if secret is None else base64.b64decode(secret.data["tls.key"])


def _assert_truthful(
    pipe: Pipeline,
    report: service.RunReport,
    fleet: Fleet,
    admin_api: Any,
    previous: Chain | None,
) -> dict[str, int]:
    """Final run; written targets hold the new key, the others their previous Secret;
    no snapshot holds the new key. Returns the run's counts."""
    assert report.finished, report
    by_name = {r.target_name: r for r in report.results}
    assert sorted(by_name) == sorted(fleet.placement), "one result per target, no duplicates"
    new_key = fleet.chain.key_pem
    old_key = previous.key_pem if previous is not None else None
    with pipe.runtime.session() as session:
        for name, (cluster, namespace, secret_name) in fleet.placement.items():
            live = _key_of(read_secret(admin_api, cluster, namespace, secret_name))
            status = by_name[name].status
            if status in WRITTEN:
                assert live == new_key, f"{name} reported {status} but does not hold the new key"
            elif by_name[name].error_reason == "write_unconfirmed":
                # Sent, answer lost: the report says it may have landed, so either is true.
                assert live in (old_key, new_key), f"{name}: unconfirmed, but holds neither key"
            else:
                assert live == old_key, f"{name} reported {status} but its Secret changed"
                assert by_name[name].error_reason or status == "skipped", by_name[name]
            target = queries.get_target_by_name(session, name)
            if queries.get_snapshot(session, fleet.distribution_id, target.id) is not None:
                _, snapshot = queries.reveal_snapshot(
                    session, pipe.runtime.sealer, fleet.distribution_id, target.id
                )
                held = snapshot["data"].get("tls.key")
                held_key = base64.b64decode(held) if held else None
                assert held_key != new_key, f"{name}: the rollback snapshot holds our content"
                assert held_key == old_key, f"{name}: the snapshot lost the previous content"
    return report.counts()


# -------------------------------------------------------------------------------- workers


def test_sigterm_lets_tasks_in_flight_finish_and_another_worker_completes_the_run(
    pipe: Pipeline, stage: Stage
) -> None:
    # Each target takes ~1 s behind the slowed proxy: tasks are surely in flight at SIGTERM.
    scene = stage("term", targets=12, latency=0.4)
    fleet = scene.fleet
    leaving = pipe.start_worker("leaving", concurrency=3)
    run_id = pipe.enqueue(fleet.distribution_id, "execute")
    _wait_done(pipe, run_id, 1)
    in_flight = _wait_in_flight(pipe, run_id)

    os.kill(leaving.process.pid, signal.SIGTERM)  # what kubelet sends to the pod's PID 1
    assert leaving.process.wait(timeout=30) == 0, leaving.log_text()[-3000:]

    after = {r.target_id: r for r in service.run_report(pipe.runtime, run_id).results}
    assert all(after[t].status in WRITTEN for t in in_flight), "warm shutdown abandoned a task"
    pipe.start_worker("successor", concurrency=3)
    report = _wait_final(pipe, run_id)
    assert report.state == "succeeded", report.reason
    assert scene.truthful(report) == {"updated": 12}


def test_a_worker_restarted_twice_in_one_run_loses_and_duplicates_nothing(
    pipe: Pipeline, stage: Stage
) -> None:
    scene = stage("twice", targets=16, clusters=2, latency=0.3, batch_size=[2, "50%"])
    fleet = scene.fleet
    run_id = pipe.enqueue(fleet.distribution_id, "execute")
    for life, done in (("first", 3), ("second", 8)):
        worker = pipe.start_worker(life, concurrency=2)
        _wait_done(pipe, run_id, done)
        worker.kill()  # the pod dies: SIGKILL, no warm shutdown
    pipe.start_worker("third", concurrency=4)

    report = _wait_final(pipe, run_id, timeout=150)

    assert report.state == "succeeded", report.reason
    counts = scene.truthful(report)
    assert set(counts) <= {"updated", "unchanged"} and sum(counts.values()) == 16, counts
    assert "reaper resumed this run" in (report.reason or ""), report.reason


# ----------------------------------------------------------------------------- databases


def test_postgres_unavailable_mid_run_tasks_retry_and_results_are_neither_lost_nor_doubled(
    pipe: Pipeline, stage: Stage, gated_postgres: tuple[str, TcpGate]
) -> None:
    _, gate = gated_postgres
    scene = stage("pgdown", targets=12, latency=0.3, batch_size=4)
    fleet = scene.fleet
    worker = pipe.start_worker("pg", concurrency=4)
    run_id = pipe.enqueue(fleet.distribution_id, "execute")
    _wait_done(pipe, run_id, 2)

    gate.cut()  # every pooled connection drops; new ones are refused
    time.sleep(3)
    gate.restore()

    report = _wait_final(pipe, run_id, timeout=150)
    assert report.state == "succeeded", report.reason
    counts = scene.truthful(report)
    assert counts == {"updated": 12}, counts
    assert all(r.attempts == 1 for r in report.results), [r.attempts for r in report.results]
    log = worker.log_text()
    assert "database unavailable" in log or "Retry in" in log, log[-3000:]


@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "no-persistence"])
def test_redis_restarted_mid_run_the_reaper_brings_the_run_to_a_truthful_end(
    persistent: bool,
    pipe: Pipeline,
    shared: Pipeline,
    persistent_redis: Any,
    make_redis_server: Callable[..., Any],
    testenv: Any,
    clusters: list[Any],
    make_service_account: Any,
    testenv_admin_api: Any,
    proxies: Callable[[Any], FaultyApiProxy],
    tmp_path: Path,
) -> None:
    if persistent:
        broker, own = persistent_redis, None
    else:
        broker = make_redis_server(appendonly=False)
        own = pipeline(
            testenv.postgres().create_database("redis"), broker.url, tmp_path
        )
        pipe = own.__enter__()
    try:
        proxy = proxies(clusters[0])
        proxy.latency = 0.3
        fleet = _fleet(
            pipe,
            clusters[:1],
            make_service_account,
            "redis",
            targets=10,
            proxy_for={clusters[0].name: proxy},
            batch_size=5,
        )
        previous = _seed_previous(fleet, testenv_admin_api)
        worker = pipe.start_worker(f"redis-{persistent}", concurrency=2)
        run_id = pipe.enqueue(fleet.distribution_id, "execute")
        _wait_done(pipe, run_id, 1)
        client = redis.Redis.from_url(broker.url)
        client.set("canary", "before-restart")
        bindings = {k for k in _redis_keys(client) if k.startswith(b"_kombu.binding")}
        broker.restart()
        canary = client.get("canary")
        kept = {k for k in _redis_keys(client) if k.startswith(b"_kombu.binding")}

        report = _wait_final(pipe, run_id, timeout=150)

        # What survives a restart (docs/reliability.md): with appendonly (fsync always)
        # everything acknowledged -- queued messages, the unacked hash, kombu's bindings;
        # without persistence nothing, and the workers re-declare their bindings.
        if persistent:
            assert canary == b"before-restart"
            assert bindings and bindings <= kept, (bindings, kept)
        else:
            assert canary is None
        assert report.state == "succeeded", report.reason
        counts = _assert_truthful(pipe, report, fleet, testenv_admin_api, previous)
        assert set(counts) <= {"updated", "unchanged"} and sum(counts.values()) == 10, counts
        assert worker.process.poll() is None, "the worker did not survive the broker restart"
    finally:
        if own is not None:
            own.__exit__(None, None, None)
            # Point this process back at the shared pipeline for the tests that follow.
            configure(app, shared.settings)
            set_runtime(shared.runtime)


def _redis_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(count=1000))


# ---------------------------------------------------------------------------- apiservers


def test_one_apiserver_stopped_mid_run_fails_only_its_targets_and_leaves_them_untouched(
    pipe: Pipeline, stage: Stage, clusters: list[Any]
) -> None:
    gate = TcpGate("127.0.0.1", clusters[0].port)
    try:
        scene = stage(
            "apidown",
            targets=12,
            clusters=2,
            proxy=False,
            gate=gate,
            batch_size=[4, 8],
            failure_threshold="100%",
        )
        fleet = scene.fleet
        pipe.start_worker("apidown", concurrency=4)
        run_id = pipe.enqueue(fleet.distribution_id, "execute")
        _wait_done(pipe, run_id, 4)
        gate.cut()

        report = _wait_final(pipe, run_id)

        counts = scene.truthful(report)
        assert report.state == "failed", report.reason
        failed = [r for r in report.results if r.status == "failed"]
        # Cut before sending: unreachable; cut with a write in flight: it may have landed.
        assert failed, report.results
        assert {r.error_reason for r in failed} <= {"unreachable", "write_unconfirmed"}, failed
        assert all(fleet.placement[r.target_name][0] is clusters[0] for r in failed)
        assert counts.get("updated", 0) >= 8, counts  # every target of the live cluster

        gate.restore()
        again = _wait_final(pipe, pipe.enqueue(fleet.distribution_id, "execute"))
        assert again.state == "succeeded", again.reason
        unconfirmed = sum(r.error_reason == "write_unconfirmed" for r in failed)
        repaired = again.counts().get("updated", 0)
        assert len(failed) - unconfirmed <= repaired <= len(failed), again.counts()
        assert repaired + again.counts().get("unchanged", 0) == len(fleet.placement), again.counts()
        scene.truthful(again)
    finally:
        gate.close()


def test_an_apiserver_throttling_briefly_is_ridden_out_by_retries(
    pipe: Pipeline, stage: Stage
) -> None:
    scene = stage("throttle", targets=6)
    fleet, proxy = scene.fleet, scene.proxy
    assert proxy is not None
    pipe.start_worker("throttle", concurrency=3)
    proxy.inject(429, count=4, retry_after=1)
    report = _wait_final(pipe, pipe.enqueue(fleet.distribution_id, "execute"))
    assert proxy.injected() == 4
    assert report.state == "succeeded", report.reason
    assert scene.truthful(report) == {"updated": 6}


def test_an_apiserver_failing_longer_than_the_retry_budget_fails_targets_truthfully(
    pipe: Pipeline, stage: Stage
) -> None:
    scene = stage("fivexx", targets=8, clusters=2, failure_threshold="100%")
    fleet, proxy = scene.fleet, scene.proxy
    assert proxy is not None
    pipe.start_worker("fivexx", concurrency=4)
    # Only writes fail: reads succeed, so each failure happens after a real decision to write.
    proxy.inject(500, seconds=30, matches=lambda method, path: method in ("PUT", "POST"))
    report = _wait_final(pipe, pipe.enqueue(fleet.distribution_id, "execute"))
    proxy.heal()

    counts = scene.truthful(report)
    assert report.state == "failed", report.reason
    assert counts == {"updated": 4, "failed": 4}, counts
    failed = [r for r in report.results if r.status == "failed"]
    assert {r.error_reason for r in failed} == {"server_error"}
    assert all("injected by the fault proxy" in (r.error_message or "") for r in failed)
    assert proxy.injected() >= 4 * 2, "each failed write was retried before giving up"


def test_a_conflicting_writer_between_our_read_and_write_costs_a_retry_not_correctness(
    pipe: Pipeline, stage: Stage, clusters: list[Any], testenv_admin_api: Any
) -> None:
    scene = stage("rival", targets=6)
    fleet, proxy = scene.fleet, scene.proxy
    assert proxy is not None
    api = k8s.CoreV1Api(testenv_admin_api(clusters[0]))
    stamped: set[str] = set()
    lock = threading.Lock()

    def rival(method: str, path: str, status: int) -> None:
        # Another controller stamps its label on each Secret right after our first read of
        # it, before that read's answer reaches us: our PUT then carries a stale version.
        if method != "GET" or status != 200 or "/secrets/" not in path:
            return
        namespace, name = path.split("/namespaces/")[1].split("/secrets/")
        with lock:
            if name in stamped:
                return
            stamped.add(name)
        patch = {"metadata": {"labels": {"rival.example.com/stamp": "1"}}}
        api.patch_namespaced_secret(name, namespace, patch)

    proxy.after_forward = rival
    pipe.start_worker("rival", concurrency=3)
    report = _wait_final(pipe, pipe.enqueue(fleet.distribution_id, "execute"))

    conflicts = sum(1 for method, _, status, _ in proxy.log if method == "PUT" and status == 409)
    assert conflicts == 6, f"expected one 409 per Secret, saw {conflicts}"
    assert report.state == "succeeded", report.reason
    assert scene.truthful(report) == {"updated": 6}
    for _, namespace, name in fleet.placement.values():
        labels = api.read_namespaced_secret(name, namespace).metadata.labels
        assert labels.get("rival.example.com/stamp") == "1", "the rival's label was dropped"


# ------------------------------------------------------------------------------- duplicates


def test_a_second_execute_is_refused_while_one_is_active_and_each_secret_is_written_once(
    pipe: Pipeline, stage: Stage
) -> None:
    scene = stage("twin", targets=10, clusters=2, proxy=False)
    fleet = scene.fleet
    pipe.start_worker("twin", concurrency=4)
    first = pipe.enqueue(fleet.distribution_id, "execute")
    # The database allows one active execute or rollback per distribution.
    with pytest.raises(service.RunAlreadyActive, match=first):
        pipe.enqueue(fleet.distribution_id, "execute")
    first_report = _wait_final(pipe, first)
    second = pipe.enqueue(fleet.distribution_id, "execute")

    reports = [first_report, _wait_final(pipe, second)]

    for report in reports:
        assert report.state == "succeeded", report.reason
        scene.truthful(report)
    for name in fleet.placement:
        statuses = sorted(r.status for rep in reports for r in rep.results if r.target_name == name)
        assert statuses == ["unchanged", "updated"], f"{name}: {statuses}"


def test_the_same_run_enqueued_twice_processes_each_target_once(
    pipe: Pipeline, stage: Stage
) -> None:
    scene = stage("again", targets=10, clusters=2, proxy=False)
    fleet = scene.fleet
    worker = pipe.start_worker("again", concurrency=4)
    run_id = pipe.enqueue(fleet.distribution_id, "execute")
    dispatcher.start(run_id)  # the scheduler retried its enqueue
    report = _wait_final(pipe, run_id)
    # Late duplicates of every target message and of every batch callback, sent by task
    # name (the contract with the scheduler) so their task ids are known.
    duplicates = [
        app.send_task("cap.kube.target", args=(run_id, *(r.target_id for r in report.results)))
    ] + [app.send_task("cap.run.advance", args=(run_id, batch)) for batch in range(report.batches)]
    # Assert only once the worker has really run every duplicate: a sleep would pass as well
    # if they had not been delivered yet.
    _wait_tasks_succeeded(worker, [duplicate.id for duplicate in duplicates])

    again = service.run_report(pipe.runtime, run_id)
    assert (again.state, again.reason, again.finished_at) == (
        report.state,
        report.reason,
        report.finished_at,
    )
    assert report.state == "succeeded", report.reason
    assert scene.truthful(again) == {"updated": 10}
    assert all(r.attempts == 1 for r in again.results)
    assert "raised unexpected" not in worker.log_text(), "a duplicate message failed a task"
