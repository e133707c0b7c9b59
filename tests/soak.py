"""Soak: continuous distribution runs over hundreds of targets while workers restart at random.

    python -m tests.soak --minutes 5 --targets 300 [--clusters 3] [--workers 2]
                         [--concurrency 4] [--restart-every 20] [--json report.json]

Starts the real test environment (kube-apiservers + etcd, Redis, PostgreSQL), a group of
``--targets`` targets spread over the clusters, and ``--workers`` Celery worker processes.
Until the time is up it renews the certificate and executes the distribution, again and
again, while a chaos thread kills (SIGKILL) or stops (SIGTERM) a random worker every
``--restart-every`` seconds on average and starts a replacement. Then it reports runs
completed by state, targets written, retries (task redeliveries and reaper recoveries),
failures by reason, worker memory over time, and checks that every Secret holds the last
certificate. Exit status 0 only when every run ended and every check held.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.certfactory import make_chain
from tests.support.pipeline import FAST_RECOVERY, Pipeline, build_fleet, pipeline, read_secret
from tests.support.workers import WorkerProcess
from tests.testenv import SPEC_MINIMUM_RULES, admin_api_client, create_service_account
from tests.testenv.environment import TestEnvironment
from worker.app import service


@dataclass
class Tally:
    """What the soak saw."""

    runs: Counter[str] = field(default_factory=Counter)
    results: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    redeliveries: int = 0
    reaper_recoveries: int = 0
    worker_restarts: Counter[str] = field(default_factory=Counter)
    run_seconds: list[float] = field(default_factory=list)
    memory: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since start, worker processes, total RSS in KiB)."""
    problems: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        """Targets created or updated, over all runs."""
        return self.results["created"] + self.results["updated"]


def _group_rss_kib(pgids: set[int]) -> tuple[int, int]:
    """Number of processes and their summed RSS (KiB) in these process groups (Linux /proc)."""
    count = total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            pgid = int(stat.rsplit(")", 1)[1].split()[2])
            if pgid not in pgids:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    count += 1
        except (OSError, ValueError, IndexError):
            continue
    return count, total


class Chaos(threading.Thread):
    """Restarts a random worker (SIGKILL or SIGTERM, at random) every ~``every`` seconds."""

    def __init__(self, pipe: Pipeline, every: float, tally: Tally, rng: random.Random) -> None:
        super().__init__(name="soak-chaos", daemon=True)
        self.pipe, self.every, self.tally, self.rng = pipe, every, tally, rng
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.live: list[WorkerProcess] = []
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(0.5, 1.5) * self.every):
            with self.lock:
                victim = self.rng.choice(self.live)
                self.live.remove(victim)
            if self.rng.random() < 0.5:
                victim.kill()
                self.tally.worker_restarts["SIGKILL"] += 1
            else:
                victim.stop(timeout=60)
                self.tally.worker_restarts["SIGTERM"] += 1
            self.add_worker()

    def add_worker(self, concurrency: int = 4) -> None:
        worker = self.pipe.start_worker(concurrency=concurrency)
        with self.lock:
            self.live.append(worker)

    def sample_memory(self) -> None:
        with self.lock:
            pgids = {w.process.pid for w in self.live}
        count, rss = _group_rss_kib(pgids)
        self.tally.memory.append((time.monotonic() - self.started, count, rss))


def _verify_secrets(pipe: Pipeline, fleet: Any, key_pem: bytes, admin: Any, tally: Tally) -> None:
    for name, (cluster, namespace, secret_name) in fleet.placement.items():
        secret = read_secret(admin, cluster, namespace, secret_name)
        data = (secret.data if secret is not None else None) or {}
        held = base64.b64decode(data["tls.key"]) if "tls.key" in data else None
        if held != key_pem:
            tally.problems.append(f"{name}: Secret does not hold the last certificate")


def soak(args: argparse.Namespace) -> int:
    """Run the soak and print its report; returns the exit status."""
    rng = random.Random(args.seed)
    tally = Tally()
    environment = TestEnvironment(cluster_count=args.clusters, environ=os.environ)
    try:
        clusters = environment.clusters()
        redis_url = environment.redis().url
        database_url = environment.postgres().create_database("soak")
        admins = {c.name: admin_api_client(c) for c in clusters}

        def make_service_account(cluster: Any, namespace: str) -> Any:
            return create_service_account(
                admins[cluster.name], cluster, namespace, SPEC_MINIMUM_RULES, None
            )

        workdir = Path(tempfile.mkdtemp(prefix="cap-soak-"))
        # FAST_RECOVERY: a 20 s hard limit, so a killed worker's claims expire after 25 s.
        with pipeline(database_url, redis_url, workdir, FAST_RECOVERY) as pipe:
            fleet = build_fleet(
                pipe,
                clusters,
                make_service_account,
                targets=args.targets,
                namespace=f"soak-{rng.randrange(16**6):06x}",
                batch_size=[10, "25%"],
                failure_threshold="100%",
            )
            chaos = Chaos(pipe, args.restart_every, tally, rng)
            for _ in range(args.workers):
                chaos.add_worker(args.concurrency)
            chaos.start()
            deadline = time.monotonic() + args.minutes * 60
            key_pem = fleet.chain.key_pem
            print(
                f"soak: {args.targets} targets over {len(clusters)} clusters, "
                f"{args.workers} workers, {args.minutes} min",
                flush=True,
            )
            while time.monotonic() < deadline:
                renewed = make_chain(cn="shop.example.com", fresh_leaf_key=True)
                service.renew_certificate(
                    pipe.runtime,
                    fleet.certificate_id,
                    {"cert": renewed.leaf_pem, "key": renewed.key_pem, "chain": renewed.chain_pem},
                )
                began = time.monotonic()
                run_id = pipe.enqueue(fleet.distribution_id, "execute")
                report = _wait(pipe, run_id, chaos, timeout=args.run_timeout)
                if report is None:
                    tally.problems.append(f"run {run_id} not final after {args.run_timeout}s")
                    break
                tally.run_seconds.append(time.monotonic() - began)
                tally.runs[report.state] += 1
                for result in report.results:
                    tally.results[result.status] += 1
                    tally.redeliveries += max(0, result.attempts - 1)
                    if result.status == "failed":
                        tally.failures[result.error_reason or "?"] += 1
                tally.reaper_recoveries += _recoveries(pipe, run_id)
                key_pem = renewed.key_pem
                print(
                    f"  run {sum(tally.runs.values())}: {report.state} in "
                    f"{tally.run_seconds[-1]:.1f}s {report.counts()}",
                    flush=True,
                )
            chaos.stopping.set()
            chaos.join(timeout=120)
            if tally.runs.get("succeeded"):
                _verify_secrets(pipe, fleet, key_pem, lambda c: admins[c.name], tally)
    finally:
        environment.close()
    _print_report(tally)
    if args.json:
        Path(args.json).write_text(json.dumps(_as_dict(tally), indent=2))
    return 0 if not tally.problems and tally.runs else 1


def _wait(pipe: Pipeline, run_id: str, chaos: Chaos, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last_sample = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - last_sample >= 5:
            chaos.sample_memory()
            last_sample = time.monotonic()
        report = service.run_report(pipe.runtime, run_id)
        if report.finished:
            return report
        time.sleep(0.5)
    return None


def _recoveries(pipe: Pipeline, run_id: str) -> int:
    from models import queries

    with pipe.runtime.session() as session:
        run = queries.get_run(session, run_id)
        return int((run.options or {}).get("reaper_recoveries", 0))


def _as_dict(tally: Tally) -> dict[str, Any]:
    return {
        "runs": dict(tally.runs),
        "targets_written": tally.written,
        "results": dict(tally.results),
        "failures_by_reason": dict(tally.failures),
        "task_redeliveries": tally.redeliveries,
        "reaper_recoveries": tally.reaper_recoveries,
        "worker_restarts": dict(tally.worker_restarts),
        "run_seconds": tally.run_seconds,
        "memory": [{"t": t, "processes": n, "rss_kib": rss} for t, n, rss in tally.memory],
        "problems": tally.problems,
    }


def _print_report(tally: Tally) -> None:
    print("\nsoak report")
    print(f"  runs completed:     {sum(tally.runs.values())} {dict(tally.runs)}")
    print(f"  targets written:    {tally.written} (results {dict(tally.results)})")
    print(
        f"  retries:            {tally.redeliveries} task redeliveries, "
        f"{tally.reaper_recoveries} reaper recoveries"
    )
    print(f"  worker restarts:    {dict(tally.worker_restarts)}")
    print(f"  failures by reason: {dict(tally.failures) or 'none'}")
    if tally.run_seconds:
        print(
            f"  run time:           min {min(tally.run_seconds):.1f}s, "
            f"max {max(tally.run_seconds):.1f}s"
        )
    print("  memory (workers' process groups):")
    step = max(1, len(tally.memory) // 12)
    for t, count, rss in tally.memory[::step]:
        print(f"    t={t:6.0f}s  {count:3d} processes  {rss / 1024:8.1f} MiB")
    for problem in tally.problems:
        print(f"  PROBLEM: {problem}")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and soak."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to soak (5)")
    parser.add_argument("--targets", type=int, default=300, help="targets in the group (300)")
    parser.add_argument("--clusters", type=int, default=3, help="kube-apiservers (3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--concurrency", type=int, default=4, help="pool size per worker (4)")
    parser.add_argument(
        "--restart-every",
        type=float,
        default=20.0,
        help="mean seconds between worker restarts (20)",
    )
    parser.add_argument(
        "--run-timeout", type=float, default=600.0, help="seconds a single run may take (600)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (repeatable chaos)")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
