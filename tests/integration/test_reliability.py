"""Failure paths that lose data or break the run's promises (issue 17), on the real environment.

Each test states the promise as the product should keep it. The ones marked
``xfail(strict=True)`` reproduce a defect that is not fixed yet: they fail today, and the
strict marker turns the day they pass into a failure, so the marker is removed together with
the fix.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from kubernetes import client as k8s

from tests.certfactory import make_chain
from tests.support.faults import FaultyApiProxy, build_faulty_fleet, seed_previous_secrets
from tests.support.pipeline import Pipeline, build_fleet, read_secret
from worker.app import service

pytestmark = pytest.mark.integration


def _namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _core(admin_api: Any, cluster: Any) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(admin_api(cluster))


def _tls_secret(name: str, namespace: str, key_pem: bytes, crt_pem: bytes) -> k8s.V1Secret:
    return k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels={"team": "edge"}),
        type="kubernetes.io/tls",
        data={
            "tls.crt": base64.b64encode(crt_pem).decode(),
            "tls.key": base64.b64encode(key_pem).decode(),
        },
    )


def test_a_snapshot_from_a_failed_first_attempt_is_replaced_by_what_is_live_at_the_next(
    pipe: Pipeline, clusters: list[Any], testenv_admin_api: Any
) -> None:
    # A broad credential (cluster admin) and a target that adopts unmanaged Secrets: the
    # namespace is missing at the first execute, so the GET answers 404 ("no Secret") and the
    # create fails with namespace_not_found. Nothing of ours landed.
    cluster = clusters[0]
    namespace = _namespace("snapa")
    rt = pipe.runtime
    credential = service.add_kubeconfig_credential(
        rt, f"{namespace}-admin", cluster.admin_kubeconfig.encode()
    )
    service.create_target(
        rt,
        service.TargetSpec(
            name=f"{namespace}-t",
            namespace=namespace,
            credential=credential,
            secret_name="web-tls",
            adopt_unmanaged=True,
        ),
        check=False,
    )
    chain = make_chain(cn="shop.example.com", fresh_leaf_key=True)
    certificate_id = service.import_certificate(
        rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
    )
    distribution_id = service.attach(
        rt, certificate_id, target=f"{namespace}-t", store_content=True
    )
    pipe.start_worker(concurrency=2)

    first = pipe.wait(pipe.enqueue(distribution_id, "execute"))
    assert first.state != "succeeded"
    assert first.results[0].error_reason == "namespace_not_found", first.results[0]

    # The team creates the namespace and puts its own Secret Y there.
    core = _core(testenv_admin_api, cluster)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    theirs = make_chain(cn="shop.example.com", fresh_leaf_key=True)
    core.create_namespaced_secret(
        namespace, _tls_secret("web-tls", namespace, theirs.key_pem, theirs.leaf_pem)
    )

    second = pipe.wait(pipe.enqueue(distribution_id, "execute"))
    assert second.state == "succeeded", second.reason
    assert second.counts() == {"updated": 1}

    rolled = pipe.wait(pipe.enqueue(distribution_id, "rollback"))
    assert rolled.state == "succeeded", (rolled.reason, rolled.results)
    restored = read_secret(testenv_admin_api, cluster, namespace, "web-tls")
    assert restored is not None
    assert base64.b64decode(restored.data["tls.key"]) == theirs.key_pem


def test_a_run_deploys_the_certificate_revision_it_was_enqueued_with(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, testenv_admin_api: Any
) -> None:
    fleet = build_fleet(
        pipe,
        clusters[:2],
        make_service_account,
        targets=4,
        namespace=_namespace("pin"),
        batch_size=[1, "100%"],
    )
    run_id = pipe.enqueue(fleet.distribution_id, "execute")
    # Renewed after the run was enqueued and before any worker took it: the run was
    # canaried (or approved) with the first revision and must deploy exactly that one.
    renewed = make_chain(cn="shop.example.com", fresh_leaf_key=True)
    service.renew_certificate(
        pipe.runtime,
        fleet.certificate_id,
        {"cert": renewed.leaf_pem, "key": renewed.key_pem, "chain": renewed.chain_pem},
    )
    pipe.start_worker(concurrency=2)

    report = pipe.wait(run_id)

    assert report.state == "succeeded", report.reason
    for name, (cluster, namespace, secret_name) in fleet.placement.items():
        secret = read_secret(testenv_admin_api, cluster, namespace, secret_name)
        assert secret is not None, name
        assert base64.b64decode(secret.data["tls.key"]) == fleet.chain.key_pem, name
        assert base64.b64decode(secret.data["tls.crt"]).startswith(fleet.chain.leaf_pem), name
    assert report.certificate is not None and report.certificate.revision == 1

    # The next run is enqueued after the renewal: it pins and deploys revision 2.
    renewal = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))
    assert renewal.state == "succeeded", renewal.reason
    assert renewal.certificate is not None and renewal.certificate.revision == 2
    assert renewal.certificate.sha256_fingerprint == renewed.leaf.fingerprint(hashes.SHA256()).hex()
    for name, (cluster, namespace, secret_name) in fleet.placement.items():
        secret = read_secret(testenv_admin_api, cluster, namespace, secret_name)
        assert base64.b64decode(secret.data["tls.key"]) == renewed.key_pem, name
        assert base64.b64decode(secret.data["tls.crt"]).startswith(renewed.leaf_pem), name


def test_a_rollback_is_refused_while_an_execute_of_the_distribution_is_active(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, testenv_admin_api: Any
) -> None:
    fleet = build_fleet(
        pipe, clusters[:1], make_service_account, targets=2, namespace=_namespace("mutex")
    )
    # Secrets exist before our first write, so the execute stores snapshots to roll back to.
    seed_previous_secrets(testenv_admin_api, fleet.placement.values(), fleet.distribution_id)
    worker = pipe.start_worker(concurrency=2)
    done = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))
    assert done.state == "succeeded", done.reason
    worker.stop()

    # No worker runs now: this execute stays queued, i.e. active.
    active = pipe.enqueue(fleet.distribution_id, "execute")
    with pytest.raises(service.ServiceError, match=active):
        pipe.enqueue(fleet.distribution_id, "rollback")
    with pytest.raises(service.ServiceError, match=active):
        pipe.enqueue(fleet.distribution_id, "execute")
    # A dry-run writes nothing and may run alongside.
    pipe.enqueue(fleet.distribution_id, "dry_run")


def test_a_threshold_breach_on_the_only_batch_halts_and_says_so(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any
) -> None:
    import socket

    cluster = clusters[0]
    namespace = _namespace("breach")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    live = make_service_account(cluster, namespace).kubeconfig
    dead = live.replace(cluster.server, f"https://127.0.0.1:{dead_port}")
    rt = pipe.runtime
    names = []
    for label, kubeconfig in (("live", live), ("dead", dead)):
        credential = service.add_kubeconfig_credential(
            rt, f"{namespace}-{label}", kubeconfig.encode()
        )
        service.create_target(
            rt,
            service.TargetSpec(
                name=f"{namespace}-{label}", namespace=namespace, credential=credential
            ),
            check=False,
        )
        names.append(f"{namespace}-{label}")
    chain = make_chain(cn="shop.example.com", fresh_leaf_key=True)
    certificate_id = service.import_certificate(
        rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
    )
    service.create_group(rt, f"{namespace}-g", names, batch_size="100%", failure_threshold=0)
    distribution_id = service.attach(rt, certificate_id, group=f"{namespace}-g")
    pipe.start_worker(concurrency=2)

    report = pipe.wait(pipe.enqueue(distribution_id, "execute"))

    assert report.state == "halted", report.reason
    assert "failure threshold exceeded (1 of 2 failed, threshold 0)" in (report.reason or "")


def test_a_webhook_run_whose_worker_died_mid_delivery_is_delivered_again_and_ends(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any
) -> None:
    from tests.support.receiver import WebhookReceiver

    with WebhookReceiver(hold=1) as receiver:
        fleet = build_fleet(
            pipe, clusters[:1], make_service_account, targets=2, namespace=_namespace("hookd")
        )
        service.add_webhook_secret(pipe.runtime, "hookd-hmac", b"h" * 32)
        service.attach_webhook(
            pipe.runtime, fleet.certificate_id, receiver.url, secret="hookd-hmac"
        )
        first = pipe.start_worker("first", concurrency=2)
        report = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))
        assert report.state == "succeeded", report.reason
        (webhook_run,) = service.stacked_runs(pipe.runtime, report.id)
        assert receiver.holding.wait(timeout=60), "the webhook was never sent"
        first.kill()  # SIGKILL during the POST, as an OOM kill would
        receiver.release()
        pipe.start_worker("second", concurrency=2)

        final = pipe.wait(webhook_run, timeout=60)

        assert final.state == "succeeded", final.reason
        deliveries = {headers.get("X-CertAutoPilot-Delivery") for headers, _ in receiver.requests}
        assert len(receiver.requests) >= 2, "the interrupted delivery was not sent again"
        assert len(deliveries) == 1 and None not in deliveries, deliveries


def test_a_certificate_cannot_steer_a_secret_into_a_system_namespace(
    pipe: Pipeline, clusters: list[Any], testenv_admin_api: Any
) -> None:
    # A broad credential, and a namespace templated from the certificate: the save cannot know
    # the value, so the run refuses it, and nothing reaches kube-system.
    cluster = clusters[0]
    rt = pipe.runtime
    prefix = _namespace("sysns")
    credential = service.add_kubeconfig_credential(
        rt, f"{prefix}-admin", cluster.admin_kubeconfig.encode()
    )
    service.create_target(
        rt,
        service.TargetSpec(
            name=f"{prefix}-t",
            namespace="{{ .cn }}",
            credential=credential,
            secret_name=f"{prefix}-tls",
        ),
        check=False,
    )
    chain = make_chain(cn="kube-system", fresh_leaf_key=True)
    certificate_id = service.import_certificate(
        rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
    )
    distribution_id = service.attach(rt, certificate_id, target=f"{prefix}-t")
    pipe.start_worker(concurrency=2)

    report = pipe.wait(pipe.enqueue(distribution_id, "execute"))

    (result,) = report.results
    assert (result.status, result.error_reason) == ("failed", "system_namespace"), result
    assert "--allow-system-namespace" in (result.error_message or "")
    assert read_secret(testenv_admin_api, cluster, "kube-system", f"{prefix}-tls") is None


def test_a_long_healthy_run_is_left_alone_by_the_reaper(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any
) -> None:
    # Issue 17 §6. Every API call is held 3 s, so one target takes about 6 s — longer than
    # the 5 s lease (CAP_STALE_AFTER) — and with one worker process the other messages wait
    # in the queue meanwhile. Nothing is lost: the reaper (every second) must not re-send.
    proxy = FaultyApiProxy(clusters[0].server, clusters[0].ca_pem)
    proxy.latency = 3.0
    try:
        fleet = build_faulty_fleet(
            pipe,
            clusters[:1],
            make_service_account,
            _namespace("long"),
            targets=3,
            proxy_for={clusters[0].name: proxy},
        )
        pipe.start_worker(concurrency=1)

        report = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"), timeout=120)

        assert report.state == "succeeded", report.reason
        assert "reaper" not in (report.reason or ""), report.reason
        assert {result.attempts for result in report.results} == {1}
        writes = [entry for entry in proxy.log if entry[0] == "POST"]
        assert len(writes) == 3, writes  # each Secret written once: no duplicate message ran
    finally:
        proxy.close()
