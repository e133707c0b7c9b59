"""The audit end to end: real kube-apiservers (two clusters), PostgreSQL, Redis and a real
worker; the CLI as a subprocess and the scheduler's Python API.

One fleet holds a target in every state — current, outdated (renewed, not executed), drifted
(replaced like ``kubectl replace`` keeps our metadata), unmanaged (a hand-made Secret with an
expired certificate), missing (deleted) and forbidden (a credential without ``get``) — and the
apiservers' own ``apiserver_request_total`` proves the audit cost one GET per target and wrote
nothing.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from bench.metrics import scrape_secret_requests, writes
from tests.certfactory import make_chain
from tests.support.pipeline import Pipeline, build_fleet, read_secret
from tests.testenv import Cluster
from worker.app import service

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("certautopilot"))

#: get is missing: the read an audit does is refused (403).
NO_GET_RULES = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "update", "patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
]


def _env(pipe: Pipeline) -> dict[str, str]:
    """The shell of an operator configured like the pipeline's workers (no other CAP_*)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CAP_")}, **pipe.env}


def _dispatcher() -> Any:
    from tasks.distribution import dispatcher

    return dispatcher


@dataclass
class AuditFleet:
    """Two distributions over two clusters, each target prepared into one audit state."""

    namespace: str
    group_distribution: str
    single_distribution: str
    expected: dict[str, str]  # target name -> state
    secrets: list[tuple[Cluster, str, str]]  # every Secret that exists: (cluster, ns, name)
    clusters: list[Cluster]


def _tls_secret(name: str, namespace: str, cert_pem: bytes, key_pem: bytes) -> k8s.V1Secret:
    return k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels={"team": "edge"}),
        type="kubernetes.io/tls",
        data={
            "tls.crt": base64.b64encode(cert_pem).decode(),
            "tls.key": base64.b64encode(key_pem).decode(),
        },
    )


def _build(
    pipe: Pipeline,
    clusters: Sequence[Cluster],
    make_service_account: Callable[..., Any],
    admin_api: Callable[[Cluster], Any],
) -> AuditFleet:
    rt = pipe.runtime
    dispatcher = _dispatcher()
    namespace = f"audit-{uuid.uuid4().hex[:6]}"
    # Certificate 1 on a group of five targets (t000 c1, t001 c2, t002 c1, t003 c2, t004 c1).
    fleet = build_fleet(
        pipe, clusters, make_service_account, targets=5, namespace=namespace, store_content=True
    )
    names = fleet.target_names
    executed = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"))
    assert executed.state == "succeeded", executed
    api = {cluster.name: k8s.CoreV1Api(admin_api(cluster)) for cluster in clusters}

    def where(target: str) -> tuple[Cluster, str, str]:
        return fleet.placement[target]

    # t002: drifted — `kubectl replace` with another certificate keeps our labels/annotations.
    cluster, ns, secret = where(names[2])
    live = api[cluster.name].read_namespaced_secret(secret, ns)
    other = make_chain(cn="hand.example.com")
    live.data["tls.crt"] = base64.b64encode(other.fullchain_pem).decode()
    api[cluster.name].replace_namespaced_secret(secret, ns, live)
    # t003: unmanaged — ours deleted, a hand-made Secret with an expired certificate instead.
    cluster, ns, secret = where(names[3])
    api[cluster.name].delete_namespaced_secret(secret, ns)
    expired = make_chain(
        cn="legacy.example.com",
        not_before=datetime.now(UTC) - timedelta(days=100),
        not_after=datetime.now(UTC) - timedelta(days=3),
    )
    api[cluster.name].create_namespaced_secret(
        ns, _tls_secret(secret, ns, expired.fullchain_pem, expired.key_pem)
    )
    # t004: missing.
    cluster, ns, secret = where(names[4])
    api[cluster.name].delete_namespaced_secret(secret, ns)
    # A sixth target in the group whose credential lacks get: forbidden.
    no_get = make_service_account(clusters[0], namespace, rules=NO_GET_RULES)
    credential = service.add_kubeconfig_credential(
        rt, f"{namespace}-no-get", no_get.kubeconfig.encode()
    )
    forbidden = f"{namespace}-no-get"
    service.create_target(
        rt,
        service.TargetSpec(
            name=forbidden, namespace=namespace, credential=credential, secret_name="fb-tls"
        ),
        check=False,
    )
    service.add_group_targets(rt, f"{namespace}-group", [forbidden])

    # Certificate 2 on one target of the second cluster: deployed (expiring in 5 days), then
    # renewed without an execute: outdated.
    soon = make_chain(
        cn="soon.example.com",
        fresh_leaf_key=True,
        not_before=datetime.now(UTC) - timedelta(days=60),
        not_after=datetime.now(UTC) + timedelta(days=5, hours=12),
    )
    certificate = service.import_certificate(
        rt, soon.leaf_pem, soon.key_pem, soon.chain_pem, soon.root_pem
    )
    single = f"{namespace}-single"
    service.create_target(
        rt,
        service.TargetSpec(
            name=single,
            namespace=namespace,
            credential=f"{namespace}-{clusters[1].name}",
            secret_name="soon-tls",
        ),
        check=False,
    )
    single_distribution = service.attach(rt, certificate, target=single, store_content=True)
    deployed = pipe.wait(pipe.enqueue(single_distribution, "execute"))
    assert deployed.state == "succeeded", deployed
    renewed = make_chain(cn="soon.example.com", fresh_leaf_key=True)
    service.renew_certificate(
        rt,
        certificate,
        {"cert": renewed.leaf_pem, "key": renewed.key_pem, "chain": renewed.chain_pem},
    )
    del dispatcher
    expected = {
        names[0]: "current",
        names[1]: "current",
        names[2]: "drifted",
        names[3]: "unmanaged",
        names[4]: "missing",
        forbidden: "forbidden",
        single: "outdated",
    }
    secrets = [where(n) for n in names[:4]] + [(clusters[1], namespace, "soon-tls")]
    return AuditFleet(
        namespace, fleet.distribution_id, single_distribution, expected, secrets, list(clusters)
    )


def _versions(admin_api: Callable[[Cluster], Any], fleet: AuditFleet) -> dict[str, str]:
    out = {}
    for cluster, namespace, name in fleet.secrets:
        secret = read_secret(admin_api, cluster, namespace, name)
        assert secret is not None
        out[f"{cluster.name}/{name}"] = secret.metadata.resource_version
    return out


def _snapshots(pipe: Pipeline) -> int:
    from sqlalchemy import func, select

    from models.entities import RollbackSnapshot

    with pipe.runtime.session() as session:
        return int(session.scalar(select(func.count()).select_from(RollbackSnapshot)) or 0)


#: Expected order for this fleet: expired, expiring, drifted, missing, forbidden, current.
ORDER = ["unmanaged", "outdated", "drifted", "missing", "forbidden", "current", "current"]


def test_audit_classifies_every_state_with_one_get_per_target_and_writes_nothing(
    pipe: Pipeline,
    clusters: list[Cluster],
    make_service_account: Callable[..., Any],
    testenv_admin_api: Callable[[Cluster], Any],
) -> None:
    pipe.start_worker()
    two = clusters[:2]
    fleet = _build(pipe, two, make_service_account, testenv_admin_api)
    admins = [testenv_admin_api(cluster) for cluster in two]
    versions, snapshots = _versions(testenv_admin_api, fleet), _snapshots(pipe)
    env = _env(pipe)

    # --- the CLI, every distribution, as a table --------------------------------------------
    before = scrape_secret_requests(admins)
    started = time.monotonic()
    table = subprocess.run(
        [CLI, "audit", "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - started
    requests = scrape_secret_requests(admins) - before
    # Exit 1: the forbidden target could not be read (the table is complete nevertheless).
    assert table.returncode == 1, table.stdout + table.stderr
    assert "audit incomplete: 1 of 6 target(s) could not be read" in table.stdout
    # Exactly one GET per readable target, nothing else: no write, no dry run, no list. RBAC
    # answers the forbidden target's GET in a filter before apiserver_request_total counts
    # requests (its 403 is on the result below, in the API server's own words).
    assert requests == {"GET": len(fleet.expected) - 1}, requests
    assert writes(requests) == 0
    # Sorted by urgency: the expired hand-made Secret, the outdated one expiring in 5 days, ...
    # A row's first line starts with its state; long details continue on indented lines.
    lines = [
        line
        for line in table.stdout.splitlines()
        if line.split(" ", 1)[0] in set(fleet.expected.values())
    ]
    states = [line.split()[0] for line in lines]
    assert states == ORDER, table.stdout
    assert "expired 3d ago" in lines[0], lines[0]
    assert lines[1].split()[1] == "5", lines[1]  # days left of the outdated (expiring) leaf
    assert "2 current" in table.stdout and "1 expired, 1 expiring within 30 days" in table.stdout
    print(
        f"\nCLI audit of {len(fleet.expected)} targets: {elapsed:.2f}s wall, {requests} + 1 refused"
    )

    # Nothing written anywhere: the same resourceVersions, no snapshot taken.
    assert _versions(testenv_admin_api, fleet) == versions
    assert _snapshots(pipe) == snapshots

    # --- the CLI, one group, as JSON ----------------------------------------------------------
    before = scrape_secret_requests(admins)
    as_json = subprocess.run(
        [CLI, "audit", "--group", f"{fleet.namespace}-group", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    report = json.loads(as_json.stdout)
    assert scrape_secret_requests(admins) - before == {"GET": 5}
    assert [run["distribution_id"] for run in report["runs"]] == [fleet.group_distribution]
    by_target = {row["target_name"]: row for row in report["rows"]}
    assert {name: row["state"] for name, row in by_target.items()} == {
        name: state for name, state in fleet.expected.items() if state != "outdated"
    }
    assert [row["state"] for row in report["rows"]] == [s for s in ORDER if s != "outdated"]
    current = next(row for row in report["rows"] if row["state"] == "current")
    assert (current["revision"], current["compared_with"]) == (1, 1)
    assert current["serial"] and current["days_left"] >= 80
    forbidden = next(row for row in report["rows"] if row["state"] == "forbidden")
    assert forbidden["error_reason"] == "forbidden"
    assert 'cannot get resource "secrets"' in forbidden["detail"]
    drifted = next(row for row in report["rows"] if row["state"] == "drifted")
    assert "changed since CertAutoPilot wrote it" in drifted["detail"]

    # --- the scheduler's Python API -------------------------------------------------------------
    dispatcher = _dispatcher()
    run_id = service.enqueue_run(pipe.runtime, dispatcher, fleet.single_distribution, "audit")
    run = pipe.wait(run_id)
    assert run.state == "succeeded" and run.reason == "succeeded: 1 outdated", run
    (result,) = run.results
    assert result.status == "outdated" and result.finding is not None
    assert (result.finding["revision"], run.certificate and run.certificate.revision) == (1, 2)
    assert result.deployed_not_after is not None
    audit = service.audit_report(pipe.runtime, [run_id], warn_days=3)
    assert audit.rows[0].days_left == 5 and audit.rows[0].state == "outdated"

    run_ids = service.enqueue_audit(pipe.runtime, dispatcher, every=True)
    assert len(run_ids) == 2
    for each in run_ids:
        # A forbidden target fails its read: the group's threshold (0) does not halt an audit.
        final = pipe.wait(each)
        assert final.state in ("succeeded", "failed") and final.state != "halted"
    merged = service.audit_report(pipe.runtime, run_ids)
    assert [row.state for row in merged.rows] == ORDER
    group_run = next(r for r in merged.runs if r.distribution_id == fleet.group_distribution)
    assert group_run.state == "failed"
    assert group_run.reason == "audit incomplete: 1 of 6 target(s) could not be read"
    assert _versions(testenv_admin_api, fleet) == versions
    assert _snapshots(pipe) == snapshots


def test_audit_refuses_bad_requests_and_queues_nothing(pipe: Pipeline) -> None:
    env = _env(pipe)
    cases = [
        ([], "choose exactly one of --distribution DIST, --group GROUP or --all"),
        (["--all", "--group", "g"], "choose exactly one of"),
        (["--all"], "there is no Kubernetes distribution to audit"),
        (["--group", "nope"], "nope"),
        (["--distribution", "0" * 8], "0" * 8),
    ]
    for args, message in cases:
        result = subprocess.run(
            [CLI, "audit", *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert service.list_runs(pipe.runtime) == []


def test_an_audit_of_200_targets_costs_one_get_each_in_one_batch(
    pipe: Pipeline,
    clusters: list[Cluster],
    make_service_account: Callable[..., Any],
    testenv_admin_api: Callable[[Cluster], Any],
) -> None:
    pipe.start_worker()
    two = clusters[:2]
    admins = [testenv_admin_api(cluster) for cluster in two]
    namespace = f"audit200-{uuid.uuid4().hex[:6]}"
    # A progressive batch size and a zero threshold: an execute canaries; an audit does not.
    fleet = build_fleet(
        pipe,
        two,
        make_service_account,
        targets=200,
        namespace=namespace,
        batch_size=[1, 5, "20%"],
        failure_threshold=0,
        store_content=False,
    )
    started = time.monotonic()
    executed = pipe.wait(pipe.enqueue(fleet.distribution_id, "execute"), timeout=300)
    execute_seconds = time.monotonic() - started
    assert executed.state == "succeeded", executed.reason

    before = scrape_secret_requests(admins)
    started = time.monotonic()
    run_id = service.enqueue_run(pipe.runtime, _dispatcher(), fleet.distribution_id, "audit")
    audited = pipe.wait(run_id, timeout=300)
    audit_seconds = time.monotonic() - started
    requests = scrape_secret_requests(admins) - before

    assert audited.state == "succeeded" and audited.reason == "succeeded: 200 current"
    assert audited.batches == 1
    assert requests == {"GET": 200}, requests
    per_target_ms = sum(r.duration_ms or 0 for r in audited.results) / 200
    print(
        f"\naudit of 200 targets on 2 apiservers, 1 worker x 4 processes: {audit_seconds:.2f}s "
        f"wall ({audit_seconds / 200 * 1000:.1f} ms/target), {per_target_ms:.1f} ms/target "
        f"processing, {requests['GET'] / 200:.2f} GET/target, 0 writes; the execute before it: "
        f"{execute_seconds:.2f}s ({executed.batches} batches)"
    )


BEAT_MODULE = """
from celery.schedules import schedule

from worker.platform.celery_app import app

app.conf.beat_schedule = {
    "audit-everything": {
        "task": "cap.audit.enqueue",
        "schedule": schedule(run_every=2.0),
        "kwargs": {"every": True},
    },
}
"""


def test_a_celery_beat_schedule_runs_audits_without_a_scheduler(
    pipe: Pipeline,
    clusters: list[Cluster],
    make_service_account: Callable[..., Any],
    tmp_path: Path,
) -> None:
    # The README's beat example, with a 2-second period: `celery -A audit_schedule beat`.
    pipe.start_worker()
    fleet = build_fleet(
        pipe,
        clusters[:1],
        make_service_account,
        targets=2,
        namespace=f"beat-{uuid.uuid4().hex[:6]}",
    )
    (tmp_path / "audit_schedule.py").write_text(BEAT_MODULE)
    env = {**_env(pipe), "PYTHONPATH": str(tmp_path)}
    beat = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("celery")),
            "-A",
            "audit_schedule:app",
            "beat",
            "--schedule",
            str(tmp_path / "beat-schedule"),
            "--loglevel",
            "INFO",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        audits: list[Any] = []
        while time.monotonic() < deadline and len(audits) < 2:
            runs = service.list_runs(pipe.runtime, distribution_id=fleet.distribution_id)
            audits = [r for r in runs if r.action == "audit" and r.finished]
            time.sleep(0.5)
    finally:
        beat.terminate()
        output, _ = beat.communicate(timeout=30)
    assert len(audits) >= 2, output[-3000:]
    assert all(r.reason == "succeeded: 2 missing" for r in audits), audits
    assert "Sending due task audit-everything (cap.audit.enqueue)" in output
