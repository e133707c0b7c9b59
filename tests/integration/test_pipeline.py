"""The worker pipeline end to end: real Celery workers, Redis, PostgreSQL, several apiservers."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline import Pipeline, build_fleet, pipeline, read_secret
from tests.support.workers import WorkerProcess


def _namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_group_of_30_targets_over_3_clusters_is_written_then_unchanged(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, testenv_admin_api: Any
) -> None:
    pipe.start_worker(concurrency=4)
    namespace = _namespace("fleet")
    fleet = build_fleet(
        pipe,
        clusters[:3],
        make_service_account,
        targets=30,
        namespace=namespace,
        batch_size=[1, 5, "50%"],
        failure_threshold="10%",
    )

    report = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))

    assert report.state == "succeeded", report.reason
    assert report.batches == 4  # 1, 5, 15, 9
    assert report.counts() == {"created": 30}
    versions: dict[str, str] = {}
    for name, (cluster, ns, secret_name) in fleet.placement.items():
        secret = read_secret(testenv_admin_api, cluster, ns, secret_name)
        assert secret is not None, name
        assert secret.type == "kubernetes.io/tls"
        assert base64.b64decode(secret.data["tls.key"]) == fleet.chain.key_pem
        assert base64.b64decode(secret.data["tls.crt"]).startswith(fleet.chain.leaf_pem)
        versions[name] = secret.metadata.resource_version

    again = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))

    assert again.state == "succeeded", again.reason
    assert again.counts() == {"unchanged": 30}
    for name, (cluster, ns, secret_name) in fleet.placement.items():
        secret = read_secret(testenv_admin_api, cluster, ns, secret_name)
        assert secret.metadata.resource_version == versions[name], f"{name} was rewritten"


def _dead_kubeconfig(make_service_account: Any, cluster: Any, namespace: str) -> str:
    """A valid kubeconfig whose server is a closed loopback port (an unreachable cluster)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return make_service_account(cluster, namespace).kubeconfig.replace(
        cluster.server, f"https://127.0.0.1:{port}"
    )


@pytest.mark.parametrize(
    ("threshold", "state", "expected"),
    [
        ("0", "halted", {"created": 2, "failed": 1, "skipped": 27}),
        ("50%", "failed", {"created": 20, "failed": 10}),
    ],
)
def test_unreachable_cluster_fails_its_targets_and_the_threshold_decides(
    pipe: Pipeline,
    clusters: list[Any],
    make_service_account: Any,
    threshold: str,
    state: str,
    expected: dict[str, int],
) -> None:
    pipe.start_worker(concurrency=4)
    namespace = _namespace("dead")
    fake = type("Dead", (), {"name": "dead-cluster"})()
    fleet = build_fleet(
        pipe,
        [clusters[0], clusters[1], fake],
        make_service_account,
        targets=30,
        namespace=namespace,
        batch_size=[3, "50%"],
        failure_threshold=threshold,
        kubeconfigs={
            "dead-cluster": _dead_kubeconfig(make_service_account, clusters[2], namespace)
        },
    )

    report = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))

    assert report.state == state, report.reason
    assert report.counts() == expected
    failed = [r for r in report.results if r.status == "failed"]
    assert {r.error_reason for r in failed} == {"unreachable"}
    assert all(
        r.target_name.endswith(("2", "5", "8")) or int(r.target_name[-3:]) % 3 == 2 for r in failed
    )
    if state == "halted":
        assert "threshold" in (report.reason or "")
        skipped = [r for r in report.results if r.status == "skipped"]
        assert all(r.batch_index >= 1 for r in skipped)
        assert all("halted after batch 1" in (r.error_message or "") for r in skipped)
    else:
        assert (report.reason or "").startswith("partially failed: 10 of 30")


def test_dry_run_writes_nothing_to_any_cluster(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, testenv_admin_api: Any
) -> None:
    pipe.start_worker(concurrency=2)
    namespace = _namespace("dry")
    fleet = build_fleet(pipe, clusters[:2], make_service_account, targets=4, namespace=namespace)

    report = pipe.wait(pipe.enqueue(fleet.distribution_id, "dry_run"))

    assert report.state == "succeeded", report.reason
    assert report.counts() == {"would_create": 4}
    assert all(r.diff and r.diff.get("action") == "create" for r in report.results)
    for cluster, ns, secret_name in fleet.placement.values():
        assert read_secret(testenv_admin_api, cluster, ns, secret_name) is None


def test_worker_killed_mid_batch_run_still_finishes_and_snapshots_hold_previous_content(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, testenv_admin_api: Any
) -> None:
    import time

    from models import queries
    from tests.support.faults import seed_previous_secrets
    from worker.core.snapshot import PreviousSecret

    namespace = _namespace("kill")
    fleet = build_fleet(
        pipe,
        clusters[:3],
        make_service_account,
        targets=24,
        namespace=namespace,
        batch_size="100%",
        failure_threshold="0",
    )
    # Every Secret exists already with an older certificate that we manage.
    old = seed_previous_secrets(testenv_admin_api, fleet.placement.values(), fleet.distribution_id)

    doomed = pipe.start_worker("doomed", concurrency=2)
    run_id = pipe.enqueue(fleet.distribution_id, "execute")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        from worker.app import service

        done = sum(
            1
            for r in service.run_report(pipe.runtime, run_id).results
            if r.status not in ("pending", "running")
        )
        if done >= 3:
            break
        time.sleep(0.05)
    doomed.kill()
    pipe.start_worker("survivor", concurrency=4)

    report = pipe.wait(run_id, timeout=180)

    assert report.state == "succeeded", report.reason
    # A target the killed worker had already written is found equal when redone.
    assert set(report.counts()) <= {"updated", "unchanged"}, report.counts()
    assert sum(report.counts().values()) == 24
    assert "reaper resumed this run" in (report.reason or ""), report.reason
    with pipe.runtime.session() as session:
        for name, (cluster, ns, secret_name) in fleet.placement.items():
            secret = read_secret(testenv_admin_api, cluster, ns, secret_name)
            assert base64.b64decode(secret.data["tls.key"]) == fleet.chain.key_pem, name
            target = queries.get_target_by_name(session, name)
            _, content = queries.reveal_snapshot(
                session, pipe.runtime.sealer, fleet.distribution_id, target.id
            )
            snapshot = PreviousSecret.from_dict(content)
            assert snapshot.existed
            assert base64.b64decode(snapshot.data["tls.key"]) == old.key_pem, (
                f"{name}: the rollback snapshot holds our own new content"
            )


def test_webhook_stacked_after_group_fires_once_on_success_and_never_on_halt(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, tmp_path: Path
) -> None:
    import hashlib
    import hmac
    import json

    from tests.support.receiver import WebhookReceiver
    from worker.app import service

    receiver = WebhookReceiver()
    received, url = receiver.requests, receiver.url
    try:
        pipe.start_worker(concurrency=4)
        secret = b"s" * 32
        service.add_webhook_secret(pipe.runtime, "rollout-hmac", secret)
        good = build_fleet(
            pipe, clusters[:2], make_service_account, targets=4, namespace=_namespace("hook")
        )
        service.attach_webhook(pipe.runtime, good.certificate_id, url, secret="rollout-hmac")

        report = pipe.wait(pipe.enqueue(good.distribution_id, "execute"))
        assert report.state == "succeeded", report.reason
        stacked = service.stacked_runs(pipe.runtime, report.id)
        assert len(stacked) == 1
        assert pipe.wait(stacked[0]).state == "succeeded"

        assert len(received) == 1
        headers, body = received[0]
        assert headers["X-CertAutoPilot-Delivery"] == stacked[0]
        timestamp = headers["X-CertAutoPilot-Timestamp"]
        expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["X-CertAutoPilot-Signature"] == f"sha256={expected}"
        payload = json.loads(body)
        assert payload["certificate"]["sha256_fingerprint"]
        assert sorted(t["secret_name"] for t in payload["targets"]) == sorted(
            s for _, _, s in good.placement.values()
        )
        assert b"PRIVATE KEY" not in body

        namespace = _namespace("hookdead")
        bad = build_fleet(
            pipe,
            [clusters[0], type("Dead", (), {"name": "dead"})()],
            make_service_account,
            targets=4,
            namespace=namespace,
            batch_size=2,
            failure_threshold=0,
            kubeconfigs={"dead": _dead_kubeconfig(make_service_account, clusters[1], namespace)},
        )
        service.attach_webhook(pipe.runtime, bad.certificate_id, url, secret="rollout-hmac")
        halted = pipe.wait(pipe.enqueue(bad.distribution_id, "execute"))
        assert halted.state == "halted"
        assert service.stacked_runs(pipe.runtime, halted.id) == []
        assert len(received) == 1
    finally:
        receiver.close()


def test_flower_lists_the_run_tasks_with_ids_only_and_no_secret_material(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, tmp_path: Path
) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import urllib3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.platform.celery_app:app",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            "--basic-auth=ops:flower-test-pw",
        ],
        env={**os.environ, **pipe.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    http = urllib3.PoolManager()
    auth = urllib3.make_headers(basic_auth="ops:flower-test-pw")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http.request("GET", f"http://127.0.0.1:{port}/healthcheck").status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                time.sleep(0.3)
        assert http.request("GET", f"http://127.0.0.1:{port}/api/tasks").status == 401
        pipe.start_worker(concurrency=2)
        namespace = _namespace("flower")
        accounts = {c.name: make_service_account(c, namespace) for c in clusters[:2]}
        fleet = build_fleet(
            pipe,
            clusters[:2],
            make_service_account,
            targets=4,
            namespace=namespace,
            kubeconfigs={name: sa.kubeconfig for name, sa in accounts.items()},
        )
        report = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))
        assert report.state == "succeeded", report.reason

        body = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = http.request("GET", f"http://127.0.0.1:{port}/api/tasks", headers=auth)
            body = response.data
            if body.count(b"cap.kube.target") >= 4:
                break
            time.sleep(0.5)
        assert body.count(b"cap.kube.target") >= 4, body[:2000]
        assert b"cap.run.start" in body
        assert report.id.encode() in body
        secrets = [fleet.chain.key_pem, *(sa.token.encode() for sa in accounts.values())]
        secrets += [line.encode() for line in fleet.chain.key_pem.decode().splitlines()[1:-1]]
        for secret in secrets:
            assert secret not in body
        assert b"PRIVATE KEY" not in body

        # Each live pool's queue is on Flower's broker page (the queues the workers report).
        pipe.workers.append(
            WorkerProcess("east", {**pipe.env, "CAP_WORKER_POOL": "east"}, pipe.log_dir)
        )
        pipe.workers[-1].wait_ready()
        lengths: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            url = f"http://127.0.0.1:{port}"
            http.request("GET", f"{url}/api/workers?refresh=1", headers=auth)
            queues = http.request("GET", f"{url}/api/queues/length", headers=auth).json()
            lengths = {queue["name"]: queue["messages"] for queue in queues["active_queues"]}
            if {"kubernetes.default", "kubernetes.east"} <= lengths.keys():
                break
            time.sleep(0.5)
        assert lengths.get("kubernetes.default") == 0, lengths
        assert lengths.get("kubernetes.east") == 0, lengths
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(timeout=30)
        log.close()


def test_embedded_default_runs_a_small_group_without_redis_or_postgres(
    clusters: list[Any], make_service_account: Any, testenv_admin_api: Any, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with pipeline(
        f"sqlite:///{data}/certautopilot.db", f"sqla+sqlite:///{data}/broker.db", tmp_path
    ) as pipe:
        assert pipe.settings.broker.url.startswith("sqla+sqlite")
        pipe.start_worker(concurrency=2)
        fleet = build_fleet(
            pipe,
            clusters[:2],
            make_service_account,
            targets=4,
            namespace=_namespace("embedded"),
            batch_size=2,
        )

        report = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"), timeout=120)

        assert report.state == "succeeded", report.reason
        assert report.counts() == {"created": 4}
        for cluster, ns, secret_name in fleet.placement.values():
            assert read_secret(testenv_admin_api, cluster, ns, secret_name) is not None
