"""Metrics and JSON logs of a real worker after real runs (PostgreSQL, Redis, apiservers).

The scrape's counters must equal the per-target results the database holds; the log lines
must parse as JSON and carry each target's run, task, target and batch.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import urllib3
from prometheus_client.parser import text_string_to_metric_families

from tests.support.pipeline import Fleet, Pipeline, build_fleet
from worker.app import service

EXAMPLES = os.environ.get("TEST_OBSERVABILITY_EXAMPLES")
"""If set, a folder where the test leaves the scrape and the JSON log (README examples)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _dead_kubeconfig(make_service_account: Any, cluster: Any, namespace: str) -> str:
    """A valid kubeconfig whose server is a closed loopback port (an unreachable cluster)."""
    return make_service_account(cluster, namespace).kubeconfig.replace(
        cluster.server, f"https://127.0.0.1:{_free_port()}"
    )


def _scrape(port: int) -> str:
    response = urllib3.request("GET", f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert response.status == 200, response.data[:300]
    return response.data.decode()


def _samples(scrape: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = float(sample.value)
    return found


def _expected_target_counts(
    reports: list[service.RunReport], fleets: list[tuple[Fleet, str]]
) -> Counter[tuple[tuple[str, str], ...]]:
    """From the database: one count per (action, outcome, reason, cluster, pool)."""
    cluster_of: dict[str, str] = {}
    for fleet, namespace in fleets:
        for name, (cluster, _, _) in fleet.placement.items():
            cluster_of[name] = f"{namespace}-{cluster.name}"  # the credential's name
    counts: Counter[tuple[tuple[str, str], ...]] = Counter()
    for report in reports:
        for result in report.results:
            skipped = result.status == "skipped"
            labels = {
                "action": report.action,
                "outcome": result.status,
                "reason": "halted" if skipped else (result.error_reason or "none"),
                "cluster": "" if skipped else cluster_of[result.target_name],
                "pool": "" if skipped else "default",  # every target here is in pool default
            }
            counts[tuple(sorted(labels.items()))] += 1
    return counts


def test_a_scrape_after_real_runs_counts_exactly_the_results_in_the_database(
    pipe: Pipeline, clusters: list[Any], make_service_account: Any, tmp_path: Path
) -> None:
    port = _free_port()
    pipe.env.update(
        CAP_METRICS_PORT=str(port),
        CAP_METRICS_ADDRESS="127.0.0.1",
        CAP_LOG_FORMAT="json",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_1.db").write_bytes(b"left by an earlier worker")
    worker = pipe.start_worker(concurrency=3)

    good_ns = f"obs-{uuid.uuid4().hex[:6]}"
    good = build_fleet(
        pipe, clusters[:2], make_service_account, targets=6, namespace=good_ns, batch_size=3
    )
    dead_ns = f"obsdead-{uuid.uuid4().hex[:6]}"
    fake = type("Dead", (), {"name": "dead-cluster"})()
    bad = build_fleet(
        pipe,
        [clusters[0], fake],
        make_service_account,
        targets=6,
        namespace=dead_ns,
        batch_size=2,
        failure_threshold="0",
        kubeconfigs={"dead-cluster": _dead_kubeconfig(make_service_account, clusters[1], dead_ns)},
    )
    reports = [
        pipe.wait(pipe.enqueue(good.distribution_id, "execute")),
        pipe.wait(pipe.enqueue(good.distribution_id, "dry_run")),
        pipe.wait(pipe.enqueue(bad.distribution_id, "execute")),
    ]
    assert [r.state for r in reports] == ["succeeded", "succeeded", "halted"]
    assert reports[0].counts() == {"created": 6}
    assert reports[1].counts() == {"unchanged": 6}
    assert reports[2].counts() == {"created": 1, "failed": 1, "skipped": 4}
    # A target of a pool no worker runs: its queue is reported by the workers that do run.
    credential = service.list_credentials(pipe.runtime)[0].name
    service.create_target(
        pipe.runtime,
        service.TargetSpec(name=f"{good_ns}-elsewhere", namespace=good_ns, credential=credential,
                           pool="elsewhere"),
        check=False,
    )  # fmt: skip

    scrape = _scrape(port)
    print(scrape)  # the README's example scrape comes from here (pytest -s)

    # Targets: the counters are the database's results, label for label.
    counted = _samples(scrape, "certautopilot_targets_processed_total")
    expected = _expected_target_counts(reports, [(good, good_ns), (bad, dead_ns)])
    assert counted == {labels: float(n) for labels, n in expected.items()}
    assert (("action", "execute"), ("cluster", f"{dead_ns}-dead-cluster"), ("outcome", "failed"),
            ("pool", "default"), ("reason", "unreachable")) in counted  # fmt: skip
    # The stale file of the "earlier worker" was wiped, not merged.
    timings = _samples(scrape, "certautopilot_target_processing_seconds_count")
    assert timings == {(("action", "execute"),): 6 + 2, (("action", "dry_run"),): 6}

    runs = _samples(scrape, "certautopilot_runs_finished_total")
    assert runs == {
        (("action", "execute"), ("kind", "kubernetes"), ("state", "succeeded")): 1,
        (("action", "dry_run"), ("kind", "kubernetes"), ("state", "succeeded")): 1,
        (("action", "execute"), ("kind", "kubernetes"), ("state", "halted")): 1,
    }
    durations = _samples(scrape, "certautopilot_run_duration_seconds_count")
    assert durations == {
        (("action", "execute"), ("kind", "kubernetes")): 2,
        (("action", "dry_run"), ("kind", "kubernetes")): 1,
    }
    retries = _samples(scrape, "certautopilot_kube_api_retries_total")
    assert retries.get((("status_class", "connection"),), 0) >= 1  # the dead cluster's

    queues = _samples(scrape, "certautopilot_queue_length")
    # The queues this worker consumes (its pool's, the un-pooled one, control) and every other
    # pool's that a target names.
    assert queues == {
        (("queue", "kubernetes.default"),): 0,
        (("queue", "kubernetes"),): 0,
        (("queue", "control"),): 0,
        (("queue", "kubernetes.elsewhere"),): 0,
    }
    assert _samples(scrape, "certautopilot_queue_length_up") == {(): 1}

    expiry = _samples(scrape, "certautopilot_certificate_expiration_timestamp_seconds")
    leaf_not_after = good.chain.leaf.not_valid_after_utc.timestamp()
    assert expiry == {
        (("common_name", "shop.example.com"), ("distribution", good.distribution_id)): (
            leaf_not_after
        )
    }  # the halted run deployed nothing it may claim; the dry-run wrote nothing

    # Nothing of a target or a Secret is a label.
    for fleet in (good, bad):
        for name, (_, _, secret_name) in fleet.placement.items():
            assert f'"{name}"' not in scrape and secret_name not in scrape
    assert "https://" not in scrape

    # JSON logs: every line of the logging system parses; each target's line has its context.
    worker.stop()
    log = worker.log_text()
    # One JSON object per line, and nothing else: no banner, no plain-text warning.
    plain = [line for line in log.splitlines() if line.strip() and not line.startswith("{")]
    assert not plain, plain[:5]
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    by_target = {
        (line["run_id"], line["target_id"]): line
        for line in lines
        if line.get("logger") == "worker.app.runs" and "target_id" in line
    }
    targets = {r.target_name: r for r in reports[0].results}
    for report in reports:
        for result in report.results:
            if result.status == "skipped":
                continue
            line = by_target[(report.id, result.target_id)]
            assert line["batch"] == result.batch_index + 1
            assert line["task_id"]
            assert result.status in line["message"]
    assert targets
    if EXAMPLES:
        folder = Path(EXAMPLES)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scrape.txt").write_text(scrape)
        (folder / "worker.jsonl").write_text(log)
        (folder / "when.txt").write_text(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
