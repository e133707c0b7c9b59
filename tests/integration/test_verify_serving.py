"""Verify serving end to end: real API server, real worker processes, and two real TLS server
processes serving the target's Secret — one that reloads by watching the Secret through the
API server (like nginx-ingress), one that read it once and never reloads (like a controller
that caches). Through the Python API (the scheduler's) and through the CLI.

What each verification costs is measured here: the worker's Secret requests come from the
API server's own ``apiserver_request_total`` (the reloading server's WATCH is its own and
left out), the time from the recorded per-endpoint seconds.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.metrics import scrape_secret_requests
from tests.certfactory import make_chain
from tests.integration.test_cli_end_to_end import _write_pems, operator
from tests.support.pipeline import Pipeline
from tests.support.tls_server import TlsServer
from tests.testenv import Cluster, ServiceAccountAccess
from worker.app import service

pytestmark = pytest.mark.integration

__all__ = ["operator"]  # the CLI fixture, imported for use here


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[TlsServer]]:
    """TLS server processes started by a test; stopped by PID afterwards, whatever happened."""
    started: list[TlsServer] = []
    yield started
    for server in started:
        server.stop()


def _serve(
    servers: list[TlsServer], cluster: Cluster, namespace: str, secret: str, mode: str, tmp: Path
) -> TlsServer:
    server = TlsServer(cluster.admin_kubeconfig, namespace, secret, mode=mode, folder=tmp)
    servers.append(server)
    return server


def _serving_fleet(
    pipe: Pipeline, namespace: str, credential: str, targets: dict[str, str], **serving: str
) -> tuple[Any, str]:
    """Targets ``name -> endpoint`` (each writing ``<name>-tls``) with ``serving`` settings, in
    a group of one batch whose threshold never halts, with a fresh certificate attached; the
    certificate's chain and the distribution id."""
    rt = pipe.runtime
    names = [f"{namespace}-{name}" for name in targets]
    for name, endpoint in targets.items():
        spec = service.TargetSpec(
            name=f"{namespace}-{name}",
            namespace=namespace,
            credential=credential,
            secret_name=f"{name}-tls",
            verify_serving=(endpoint,),
            **serving,  # type: ignore[arg-type]
        )
        service.create_target(rt, spec, check=False)
    chain = make_chain(cn="shop.example.com", fresh_leaf_key=True)
    certificate_id = service.import_certificate(
        rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
    )
    service.create_group(rt, f"{namespace}-g", names, batch_size="100%", failure_threshold="100%")
    return chain, service.attach(rt, certificate_id, group=f"{namespace}-g")


def _non_watch(requests: dict[str, int]) -> dict[str, int]:
    return {verb: n for verb, n in requests.items() if verb != "WATCH" and n}


def test_the_reloading_endpoint_verifies_and_the_caching_one_still_serves_the_old_serial(
    pipe: Pipeline,
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    testenv_admin_api: Callable[[Cluster], Any],
    servers: list[TlsServer],
    tmp_path: Path,
) -> None:
    rt = pipe.runtime
    namespace = f"serving-{uuid.uuid4().hex[:8]}"
    access = make_service_account(cluster, namespace)
    credential = service.add_kubeconfig_credential(rt, f"{namespace}-c", access.kubeconfig.encode())
    reloading = _serve(servers, cluster, namespace, "reload-tls", "reload", tmp_path)
    caching = _serve(servers, cluster, namespace, "cache-tls", "once", tmp_path)
    chain, distribution_id = _serving_fleet(
        pipe,
        namespace,
        credential,
        {"reload": reloading.endpoint, "cache": caching.endpoint},
        serving_deadline="5s",
        serving_ca="own-chain",
    )
    pipe.start_worker()
    admin = [testenv_admin_api(cluster)]
    time.sleep(1)  # the servers' initial GET and WATCH are counted before the run
    before = scrape_secret_requests(admin)

    started = time.monotonic()
    report = pipe.wait(pipe.enqueue(distribution_id, "execute"), timeout=120)
    elapsed = time.monotonic() - started

    after = scrape_secret_requests(admin)
    assert report.state == "succeeded", report
    results = {r.target_name.rsplit("-", 1)[1]: r for r in report.results}
    # The write is unaffected: both Secrets were created.
    assert {r.status for r in results.values()} == {"created"}
    verified = results["reload"]
    assert verified.serving_status == "verified"
    (line,) = verified.serving_lines()
    assert line.startswith(f"serving {reloading.endpoint}: verified after ")
    assert line.endswith("; chain valid")  # own-chain: the served chain validates
    verified_seconds = verified.serving[0]["seconds"]
    assert verified_seconds < 5
    stale = results["cache"]
    assert stale.serving_status == "stale"
    (line,) = stale.serving_lines()
    # The caching server still serves what it loaded at start (its fallback certificate).
    assert f"serving {caching.endpoint}: still serving serial " in line
    assert stale.serving[0]["serial"] != format(chain.leaf.serial_number, "x")
    assert 5 <= stale.serving[0]["seconds"] < 7
    assert "Secret" in reloading.log_text() and "(watch)" in reloading.log_text()
    assert "(watch)" not in caching.log_text()
    # Cost: verification adds no API request; the worker did GET + POST per target, as ever.
    moved = _non_watch({verb: after[verb] - before.get(verb, 0) for verb in after})
    assert moved == {"GET": 2, "POST": 2}, moved
    print(
        f"\nverify serving: reloading endpoint verified after {verified_seconds:.2f}s "
        f"({verified.serving[0]['attempts']} handshake(s) + 1 chain check); caching endpoint "
        f"gave up after {stale.serving[0]['seconds']:.2f}s ({stale.serving[0]['attempts']} "
        f"handshakes); run {elapsed:.1f}s; Secret API requests during the run: {moved}"
    )


def test_require_serving_halts_the_rollout_after_a_canary_that_does_not_serve_it(
    operator: Callable[..., subprocess.CompletedProcess[str]],
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    servers: list[TlsServer],
    tmp_path: Path,
) -> None:
    namespace = f"canary-{uuid.uuid4().hex[:8]}"
    access = make_service_account(cluster, namespace)
    _, pems = _write_pems(tmp_path, "shop.example.com")

    def ok(*args: str, stdin: str | None = None) -> str:
        result = operator(*args, stdin=stdin)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    ok("credentials", "add-kubeconfig", "c1", "--stdin", stdin=access.kubeconfig)
    cert = json.loads(ok("certs", "import", "--cert", pems["cert"], "--key", pems["key"],
                         "--chain", pems["chain"], "-o", "json"))  # fmt: skip
    canary = _serve(servers, cluster, namespace, "canary-tls", "once", tmp_path)
    fleet = [
        _serve(servers, cluster, namespace, f"edge{i}-tls", "reload", tmp_path) for i in (1, 2)
    ]
    for name, server in (("canary", canary), ("edge1", fleet[0]), ("edge2", fleet[1])):
        saved = ok(
            "targets", "add", name, "--namespace", namespace, "--kubeconfig-credential", "c1",
            "--secret-name", f"{name}-tls", "--verify-serving", server.endpoint,
            "--serving-deadline", "4s", "--no-check", "-o", "json",
        )  # fmt: skip
        assert json.loads(saved)["verify_serving"] == [server.endpoint]
    shown = ok("targets", "show", "canary")
    assert canary.endpoint in shown and "4 s" in shown
    group = ok(
        "groups", "create", "fleet", "--target", "canary", "--target", "edge1", "--target",
        "edge2", "--batch-size", "1,100%", "--failure-threshold", "0", "--require-serving",
    )  # fmt: skip
    assert "require serving:   yes" in group
    distribution = json.loads(
        ok("distributions", "attach", cert["id"], "--group", "fleet", "-o", "json")
    )

    executed = operator("run", distribution["id"], "--execute", "-o", "json")
    assert executed.returncode == 1, executed.stdout + executed.stderr
    report = json.loads(executed.stdout)["run"]
    assert report["state"] == "halted"
    assert report["reason"].startswith("halted after batch 1:")
    assert "2 target(s) skipped" in report["reason"]
    by_name = {r["target_name"]: r for r in report["results"]}
    canary_result = by_name["canary"]
    assert (canary_result["status"], canary_result["error_reason"]) == ("failed", "not_serving")
    assert canary_result["error_message"].startswith(
        "the Secret was created, but the new certificate is not served"
    )
    assert canary_result["serving_status"] == "stale"
    assert canary_result["serving"][0]["state"] == "stale"
    assert {by_name[n]["status"] for n in ("edge1", "edge2")} == {"skipped"}
    shown = ok("runs", "show", report["id"])
    assert "[not_serving] the Secret was created" in shown
    assert f"serving {canary.endpoint}: still serving serial" in shown

    # Without --require-serving the same canary is reported, not failed: the rollout goes on.
    ok("groups", "create", "lenient", "--target", "canary", "--target", "edge1",
       "--batch-size", "1,100%", "--failure-threshold", "0")  # fmt: skip
    lenient = json.loads(
        ok("distributions", "attach", cert["id"], "--group", "lenient", "-o", "json")
    )
    done = json.loads(ok("run", lenient["id"], "--execute", "-o", "json"))["run"]
    assert done["state"] == "succeeded", done
    by_name = {r["target_name"]: r for r in done["results"]}
    # Same certificate, another distribution: only its distribution-id annotation changes.
    assert by_name["canary"]["status"] == "updated"
    assert by_name["canary"]["serving_status"] == "stale"
    assert by_name["edge1"]["status"] == "created"
    assert by_name["edge1"]["serving_status"] == "verified"


def test_a_message_verifies_its_targets_concurrently_so_it_costs_one_deadline(
    pipe: Pipeline,
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    servers: list[TlsServer],
    tmp_path: Path,
) -> None:
    # 48 targets travel 3 to a message (tasks.distribution.targets_per_message), 16 messages
    # over 4 pool processes: 4 rounds. Each target's endpoint never serves the new leaf, so
    # each takes its whole 3 s deadline: about 4 x 3 s when a message verifies its targets at
    # once, 4 x 9 s if it verified them one after the other.
    rt = pipe.runtime
    namespace = f"many-{uuid.uuid4().hex[:8]}"
    access = make_service_account(cluster, namespace)
    credential = service.add_kubeconfig_credential(rt, f"{namespace}-c", access.kubeconfig.encode())
    caching = _serve(servers, cluster, namespace, "never-written-tls", "once", tmp_path)
    _, distribution_id = _serving_fleet(
        pipe,
        namespace,
        credential,
        {f"t{index:02d}": caching.endpoint for index in range(48)},
        serving_deadline="3s",
    )
    pipe.start_worker(concurrency=4)

    started = time.monotonic()
    report = pipe.wait(pipe.enqueue(distribution_id, "execute"), timeout=180)
    elapsed = time.monotonic() - started

    assert report.state == "succeeded", report
    assert {r.status for r in report.results} == {"created"}
    assert {r.serving_status for r in report.results} == {"stale"}
    seconds = [r.serving[0]["seconds"] for r in report.results]
    assert min(seconds) >= 3 and max(seconds) < 4.5, seconds  # each had its whole deadline
    assert elapsed < 25, f"{elapsed:.1f}s: the targets of a message were not verified at once"
    print(f"\n48 targets, 3 s deadline each, 4 pool processes: run {elapsed:.1f}s")
