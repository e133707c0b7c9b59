"""The fan-out benchmark: one certificate to N targets over real apiservers, with baselines.

For each W (worker processes) and N (targets), on the same clusters in the same run:

* the pipeline: Redis + PostgreSQL + W real Celery workers, enqueue -> run finished;
* baseline (b) the bare kubernetes-client script (:mod:`bench.bare`), W x concurrency threads;
* baseline (a) the kubectl shell loop (:mod:`bench.kubectl`), once per N (it has no W);
* the unchanged re-run of the pipeline (time, and zero writes counted at the apiservers).

Every target is its own namespace on one of the clusters (round-robin), so N targets are
N namespaces. Each cell writes fresh Secret names, so every first write is a create.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench import metrics
from bench.kubectl import find_kubectl, kubectl_loop

REPO = Path(__file__).resolve().parents[1]

#: Production settings (the tests' short recovery limits would make the reaper run every
#: second); identical to the defaults in worker/platform/settings.py, spelled out for the record.
PRODUCTION_ENV = {
    "CAP_TASK_TIME_LIMIT": "660",
    "CAP_TASK_SOFT_TIME_LIMIT": "600",
    "CAP_BROKER_VISIBILITY_TIMEOUT": "3600",
    "CAP_STALE_AFTER": "60",
    "CAP_RESEND_AFTER": "300",
    "CAP_REAPER_INTERVAL": "15",
    "CAP_KUBE_RETRY_ATTEMPTS": "5",
    "CAP_KUBE_RETRY_MAX_SECONDS": "30",
    "CAP_KUBE_CONNECT_TIMEOUT": "5",
    "CAP_KUBE_READ_TIMEOUT": "15",
}
BENCH_SA = "cap-bench"


@dataclass(frozen=True)
class Options:
    """What to run."""

    sizes: tuple[int, ...] = (50, 200, 1000)
    workers: tuple[int, ...] = (1, 2, 4)
    concurrency: int = 4
    clusters: int = 4
    kubectl_max: int = 200
    """The kubectl loop runs only for N up to this (it is slow by nature)."""
    workdir: Path | None = None
    repeat: int = 1
    """Runs of the pipeline and of the bare client per cell; the table shows the medians."""
    profile_dir: Path | None = None
    profile_idle: bool = False
    """Sample waiting threads too (py-spy --idle): where the wall time goes, not only CPU."""
    """Record py-spy profiles (collapsed stacks) of the workers' pipeline phases here."""
    namespaces: int = 1000
    """Namespaces per run at most: target i goes to namespace i mod this (several targets
    share a namespace beyond it; every target's Secret name carries its own number)."""
    embedded: tuple[int, ...] = ()
    """N of the cells run again on the embedded default (SQLite + SQLAlchemy broker), W=1."""
    first_write: int = 0
    """Runs of the first-write latency cell on each path (0: none)."""


@dataclass
class Cell:
    """One measured (N, W) combination."""

    n: int
    w: int
    path: str = "redis+pg"
    """``redis+pg`` (Redis broker, PostgreSQL) or ``embedded`` (SQLite + SQLAlchemy broker)."""
    pipeline_s: float = 0.0
    pipeline_runs: list[float] = field(default_factory=list)
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    reach_p95_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    api_requests: dict[str, int] = field(default_factory=dict)
    db_transactions: int = 0
    db_statements: int | None = None
    """None when PostgreSQL runs without pg_stat_statements."""
    broker_calls: dict[str, int] = field(default_factory=dict)
    bare_s: float = 0.0
    bare_runs: list[float] = field(default_factory=list)
    bare_cpu_s: float = 0.0
    """CPU seconds of the bare client process (last run)."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per component during the pipeline phase (last run)."""
    bare_phase_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per component during the bare phase (last run)."""
    bare_p50_ms: float = 0.0
    bare_api_requests: dict[str, int] = field(default_factory=dict)
    kubectl_s: float | None = None
    kubectl_api_requests: dict[str, int] = field(default_factory=dict)
    rss_mb_max: float = 0.0
    rss_mb_pool: list[float] = field(default_factory=list)
    rss_mb_runs: list[float] = field(default_factory=list)
    rss_mb_main: list[float] = field(default_factory=list)
    """RSS of each worker's main (consumer) process; the rest are its pool processes."""
    """Largest worker RSS after each pipeline run of the cell (flat when nothing leaks)."""
    threads: int = 0
    rerun_s: float = 0.0
    rerun_counts: dict[str, int] = field(default_factory=dict)
    rerun_api_requests: dict[str, int] = field(default_factory=dict)
    bare_cpu_runs: list[float] = field(default_factory=list)
    own_cpu_runs: list[float] = field(default_factory=list)
    """CPU seconds of workers + PostgreSQL + Redis in each pipeline run."""

    @property
    def targets_per_s(self) -> float:
        """Pipeline throughput."""
        return self.n / self.pipeline_s if self.pipeline_s else 0.0

    def per_target(self, total: float) -> float:
        """``total`` divided by the number of targets."""
        return total / self.n


# ----------------------------------------------------------------------------- fleet


@dataclass
class Fleet:
    """The clusters, the benchmark identity on each, and one namespace per target slot."""

    clusters: list[Any]
    admin: list[Any]
    kubeconfigs: dict[str, str] = field(default_factory=dict)
    kubeconfig_files: dict[str, Path] = field(default_factory=dict)
    slots: list[tuple[int, str]] = field(default_factory=list)
    """Target slot i -> (cluster index, namespace)."""

    def placement(self, n: int) -> list[tuple[int, str]]:
        """The first ``n`` slots."""
        return self.slots[:n]


def prepare_fleet(clusters: list[Any], max_n: int, folder: Path, namespaces: int = 1000) -> Fleet:
    """Create the benchmark ServiceAccount (spec-minimum rules, cluster-wide) and namespaces."""
    from kubernetes import client as k8s

    from tests.testenv import SPEC_MINIMUM_RULES, admin_api_client, create_service_account
    from tests.testenv.access import _create_or_keep, ensure_namespace

    admin = [admin_api_client(cluster) for cluster in clusters]
    fleet = Fleet(clusters=clusters, admin=admin)
    folder.mkdir(parents=True, exist_ok=True)
    for cluster, api in zip(clusters, admin, strict=True):
        access = create_service_account(api, cluster, BENCH_SA, rules=None, name=BENCH_SA)
        rbac = k8s.RbacAuthorizationV1Api(api)
        # The spec's minimum Role, granted in every namespace: each target is a namespace.
        # Plain dicts: the client serialises them like its models.
        role: Any = {"metadata": {"name": BENCH_SA}, "rules": SPEC_MINIMUM_RULES}
        binding: Any = {
            "metadata": {"name": BENCH_SA},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": BENCH_SA,
            },
            "subjects": [{"kind": "ServiceAccount", "name": BENCH_SA, "namespace": BENCH_SA}],
        }
        _create_or_keep(partial(rbac.create_cluster_role, role))
        _create_or_keep(partial(rbac.create_cluster_role_binding, binding))
        fleet.kubeconfigs[cluster.name] = access.kubeconfig
        path = folder / f"{cluster.name}.kubeconfig"
        path.touch(mode=0o600)
        path.write_text(access.kubeconfig)
        fleet.kubeconfig_files[cluster.name] = path
    fleet.slots = slots(len(clusters), max_n, namespaces)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda slot: ensure_namespace(admin[slot[0]], slot[1]), set(fleet.slots)))
    return fleet


def slots(clusters: int, n: int, namespaces: int) -> list[tuple[int, str]]:
    """Target slot i -> (cluster i mod clusters, namespace i mod ``namespaces``): a namespace
    stays on one cluster as long as ``namespaces`` is a multiple of ``clusters``."""
    namespaces = max(clusters, namespaces - namespaces % clusters)
    return [(i % clusters, f"capb-{i % namespaces:04d}") for i in range(n)]


def secret_names(cn: str, n: int) -> list[str]:
    """The Secret name of each of the first ``n`` slots for a certificate whose ``cn`` template
    variable is ``cn`` (what the targets' template renders: :data:`SECRET_TEMPLATE`)."""
    return [f"{cn}-{i:05d}" for i in range(n)]


#: Every bench target's Secret name: the certificate's CN (fresh per cell, so every first
#: write is a create) and the target's own number (several targets share a namespace).
SECRET_TEMPLATE = "{{ cn }}-{{ slot }}"  # noqa: S105 - a name template, not a secret


# ------------------------------------------------------------------------- measuring


@dataclass
class Probes:
    """Reads every counter the table reports, before and after a phase."""

    admin: list[Any]
    pg_conninfo: str | None
    """None on the embedded path (no server to ask; its database work is in the workers)."""
    redis_url: str | None
    bench_transactions: Callable[[], int]
    bench_statements: Callable[[], int]
    processes: Callable[[], dict[str, list[int]]]
    """Process ids by component (workers, postgres, redis, kube = apiservers + etcd)."""

    def snapshot(self) -> dict[str, Any]:
        """Current counters (after letting PostgreSQL publish its statistics)."""
        if self.pg_conninfo is None:
            pg, statements = 0, None
        else:
            metrics.wait_for_pg_stats()
            pg = metrics.pg_transactions(self.pg_conninfo) - self.bench_transactions()
            statements = _minus(metrics.pg_statements(self.pg_conninfo), self.bench_statements())
        return {
            "api": metrics.scrape_secret_requests(self.admin),
            "pg": pg,
            "pg_statements": statements,
            "redis": metrics.redis_command_calls(self.redis_url) if self.redis_url else Counter(),
            "cpu": {name: metrics.cpu_seconds(pids) for name, pids in self.processes().items()},
        }

    @staticmethod
    def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
        """What moved between two snapshots (minus the probe's own transactions)."""
        return {
            "api": dict(metrics.counter_delta(after["api"], before["api"])),
            "pg": after["pg"]
            - before["pg"]
            - (metrics.PG_PROBE_TRANSACTIONS if after["pg"] else 0),
            "pg_statements": _minus(
                _minus(after["pg_statements"], before["pg_statements"]),
                metrics.PG_PROBE_STATEMENTS,
            ),
            "redis": dict(metrics.counter_delta(after["redis"], before["redis"])),
            # Only processes alive at both ends count; a pool process replaced meanwhile
            # would make this smaller, never larger.
            "cpu": {
                name: round(after["cpu"][name] - before["cpu"].get(name, 0.0), 3)
                for name in after["cpu"]
            },
        }


def _minus(value: int | None, other: int) -> int | None:
    return None if value is None else value - other


@contextmanager
def measured(probes: Probes) -> Iterator[dict[str, Any]]:
    """Fill the yielded dict with the counter deltas of the block."""
    moved: dict[str, Any] = {}
    before = probes.snapshot()
    yield moved
    moved.update(Probes.delta(probes.snapshot(), before))


# --------------------------------------------------------------------------- pipeline


class PipelineDriver:
    """Targets, certificates and runs through the backend API; runs timed from the DB."""

    def __init__(self, pipe: Any, fleet: Fleet) -> None:
        from worker.app import service

        self.pipe = pipe
        self.fleet = fleet
        self.polls = 0
        self.target_names: list[str] = []
        self._credentials = {
            cluster.name: service.add_kubeconfig_credential(
                pipe.runtime, f"bench-{cluster.name}", fleet.kubeconfigs[cluster.name].encode()
            )
            for cluster in fleet.clusters
        }

    def ensure_targets(self, n: int) -> None:
        """The first ``n`` slots as targets (made once, shared by every cell of the run)."""
        from worker.app import service

        rt = self.pipe.runtime
        for index in range(len(self.target_names), n):
            cluster_index, namespace = self.fleet.slots[index]
            cluster = self.fleet.clusters[cluster_index]
            name = f"bench-t{index:05d}"
            service.create_target(
                rt,
                service.TargetSpec(
                    name=name,
                    namespace=namespace,
                    credential=self._credentials[cluster.name],
                    secret_name=SECRET_TEMPLATE,
                    variables={"slot": f"{index:05d}"},
                ),
                check=False,
            )
            self.target_names.append(name)

    def distribution(
        self, n: int, tag: str, chain: Any, *, batch_size: Any = None, first: int = 0
    ) -> str:
        """A group of ``n`` targets (from slot ``first``), the certificate, attached."""
        from worker.app import service

        rt = self.pipe.runtime
        self.ensure_targets(first + n)
        certificate_id = service.import_certificate(
            rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
        )
        group = f"bench-{tag}"
        service.create_group(rt, group, self.target_names[first : first + n], batch_size=batch_size)
        return str(service.attach(rt, certificate_id, group=group))

    def run(self, distribution_id: str, timeout: float = 1800.0) -> tuple[float, Any]:
        """Enqueue an execute run; return (seconds from enqueue to finished_at, report)."""
        from models import queries
        from worker.app import service

        rt = self.pipe.runtime
        enqueued = datetime.now(UTC)
        run_id = self.pipe.enqueue(distribution_id, "execute")
        deadline = time.monotonic() + timeout
        while True:
            with rt.session() as session:
                self.polls += 1
                run = queries.get_run(session, run_id)
                state, finished_at = run.state, run.finished_at
            if state.is_terminal:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} not finished after {timeout}s")
            time.sleep(0.05)
        self.polls += 1
        report = service.run_report(rt, run_id)
        assert finished_at is not None  # a terminal run has its finish time
        if finished_at.tzinfo is None:
            finished_at = finished_at.replace(tzinfo=UTC)
        return (finished_at - enqueued).total_seconds(), (report, enqueued)


def _latencies(report: Any) -> list[float]:
    return [float(r.duration_ms) for r in report.results if r.duration_ms is not None]


def _reach_seconds(report: Any, enqueued: datetime, finished: Sequence[datetime]) -> list[float]:
    return [(moment - enqueued).total_seconds() for moment in finished]


def _finished_moments(pipe: Any, run_id: str) -> list[datetime]:
    from models import queries

    with pipe.runtime.session() as session:
        moments = [r.finished_at for r in queries.list_target_results(session, run_id)]
    return [m if m.tzinfo else m.replace(tzinfo=UTC) for m in moments if m is not None]


def _worker_stats(pipe: Any) -> list[metrics.ProcessStats]:
    pids = itertools.chain.from_iterable(
        metrics.process_tree(worker.process.pid) for worker in pipe.workers
    )
    return metrics.process_stats(pids)


@contextmanager
def profiled(pipe: Any, folder: Path | None, name: str, *, idle: bool = False) -> Iterator[None]:
    """Sample every worker process with py-spy during the block (when ``folder`` is set)."""
    if folder is None:
        yield
        return
    import shutil

    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy on PATH (pip install py-spy)")
    folder.mkdir(parents=True, exist_ok=True)
    samplers = [
        subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(worker.process.pid),
                "--subprocesses",
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                *(["--idle"] if idle else []),
                "--output",
                str(folder / f"{name}-{worker.name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for worker in pipe.workers
    ]
    time.sleep(1.0)  # py-spy attaches before the first task arrives
    try:
        yield
    finally:
        for sampler in samplers:
            sampler.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for sampler in samplers:
            sampler.wait(timeout=60)


# ------------------------------------------------------------------------------ driver


def _write_pem(folder: Path, chain: Any) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    cert.write_bytes(chain.leaf_pem + chain.chain_pem)
    key.touch(mode=0o600)
    key.write_bytes(chain.key_pem)
    return cert, key


def _bare(fleet: Fleet, n: int, cn: str, threads: int, cert: Path, key: Path) -> Any:
    plan = {
        "kubeconfigs": {name: str(path) for name, path in fleet.kubeconfig_files.items()},
        "targets": [
            [fleet.clusters[c].name, ns, name]
            for (c, ns), name in zip(fleet.placement(n), secret_names(cn, n), strict=True)
        ],
        "cert_file": str(cert),
        "key_file": str(key),
        "threads": threads,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.bare"],
        input=json.dumps(plan),
        text=True,
        capture_output=True,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the bare client failed: {done.stdout[-500:]} {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _component_pids(env: Any, pipe: Any, *, servers: bool = True) -> dict[str, list[int]]:
    def tree(process: Any) -> list[int]:
        return metrics.process_tree(process.pid) if process and process.pid else []

    kube = [pid for process in env.cluster_set.processes() for pid in tree(process)]
    return {
        "workers": [pid for w in pipe.workers for pid in metrics.process_tree(w.process.pid)],
        # The embedded path uses neither server (their idle CPU is not its cost).
        "postgres": tree(env.postgres().process) if servers else [],
        "redis": tree(env.redis().process) if servers else [],
        "kube": kube,
    }


def _libpq_url(sqlalchemy_url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(False)


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


@dataclass
class Context:
    """What every cell measures with."""

    options: Options
    workdir: Path
    fleet: Fleet
    pipe: Any
    driver: PipelineDriver
    probes: Probes
    kubectl: Path | None
    path: str = "redis+pg"
    kubectl_done: dict[int, tuple[float, dict[str, int]]] = field(default_factory=dict)


@dataclass
class FirstWrite:
    """Enqueue -> first Secret written, over several runs of a canary distribution."""

    path: str
    w: int
    ms: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        """Median."""
        return metrics.percentile(self.ms, 0.5)

    @property
    def p95_ms(self) -> float:
        """95th percentile (nearest rank)."""
        return metrics.percentile(self.ms, 0.95)


@dataclass
class Results:
    """Everything one ``python -m bench`` measured."""

    cells: list[Cell] = field(default_factory=list)
    first_writes: list[FirstWrite] = field(default_factory=list)


def _own_cpu(cpu: dict[str, float]) -> float:
    return sum(cpu.get(name, 0.0) for name in ("workers", "postgres", "redis"))


def measure_cell(ctx: Context, n: int, w: int) -> Cell:
    """Bare client and pipeline (``repeat`` times each), the unchanged re-run, kubectl."""
    from tests.certfactory import make_chain

    options, fleet, probes = ctx.options, ctx.fleet, ctx.probes
    cell = Cell(n=n, w=w, path=ctx.path)
    threads = w * options.concurrency
    prefix = "e" if ctx.path == "embedded" else "p"
    for attempt in range(options.repeat):
        tag = f"{prefix}n{n}-w{w}-r{attempt}"
        chain = make_chain(cn=f"{tag}.bench.example")
        cert, key = _write_pem(ctx.workdir / f"pem-{tag}", chain)
        distribution_id = ctx.driver.distribution(n, tag, chain)

        say(f"{ctx.path} N={n} W={w}: bare client, {threads} threads")
        with measured(probes) as moved:
            bare = _bare(fleet, n, f"bare-{tag}.bench.example", threads, cert, key)
        cell.bare_runs.append(round(bare["wall_seconds"], 3))
        cell.bare_p50_ms = metrics.percentile(bare["latencies_ms"], 0.5)
        cell.bare_api_requests = moved["api"]
        cell.bare_cpu_s = round(bare["cpu_seconds"], 3)
        cell.bare_cpu_runs.append(cell.bare_cpu_s)
        cell.bare_phase_cpu_s = moved["cpu"]

        say(f"{ctx.path} N={n} W={w}: pipeline")
        with (
            measured(probes) as moved,
            profiled(ctx.pipe, options.profile_dir, tag, idle=options.profile_idle),
        ):
            seconds, (report, enqueued) = ctx.driver.run(distribution_id)
        cell.pipeline_runs.append(round(seconds, 3))
        cell.counts = report.counts()
        cell.api_requests = moved["api"]
        cell.db_transactions = moved["pg"]
        cell.db_statements = moved["pg_statements"]
        cell.broker_calls = moved["redis"]
        cell.cpu_s = moved["cpu"]
        cell.own_cpu_runs.append(round(_own_cpu(moved["cpu"]), 3))
        cell.rss_mb_runs.append(round(max(s.rss_mb for s in _worker_stats(ctx.pipe)), 1))
    cell.pipeline_s = statistics.median(cell.pipeline_runs)
    cell.bare_s = statistics.median(cell.bare_runs)
    latencies = _latencies(report)
    cell.p50_ms = metrics.percentile(latencies, 0.5)
    cell.p95_ms = metrics.percentile(latencies, 0.95)
    reach = _reach_seconds(report, enqueued, _finished_moments(ctx.pipe, report.id))
    cell.reach_p95_s = metrics.percentile(reach, 0.95)
    stats = _worker_stats(ctx.pipe)
    cell.rss_mb_max = max(s.rss_mb for s in stats)
    cell.rss_mb_pool = sorted(round(s.rss_mb, 1) for s in stats)
    mains = {worker.process.pid for worker in ctx.pipe.workers}
    cell.rss_mb_main = [round(s.rss_mb, 1) for s in stats if s.pid in mains]
    cell.threads = sum(s.threads for s in stats)

    say(f"{ctx.path} N={n} W={w}: unchanged re-run")
    with measured(probes) as moved:
        cell.rerun_s, (rerun, _) = ctx.driver.run(distribution_id)
    cell.rerun_counts = rerun.counts()
    cell.rerun_api_requests = moved["api"]

    if ctx.kubectl is not None and n <= options.kubectl_max:
        if n not in ctx.kubectl_done:
            say(f"N={n}: kubectl loop")
            targets = [
                (str(fleet.kubeconfig_files[fleet.clusters[c].name]), ns, name)
                for (c, ns), name in zip(
                    fleet.placement(n), secret_names(f"kubectl-n{n}", n), strict=True
                )
            ]
            with measured(probes) as moved:
                seconds = kubectl_loop(
                    ctx.kubectl,
                    targets,
                    cert_file=cert,
                    key_file=key,
                    workdir=ctx.workdir / "kubectl-home",
                )
            ctx.kubectl_done[n] = (seconds, moved["api"])
        cell.kubectl_s, cell.kubectl_api_requests = ctx.kubectl_done[n]
    return cell


#: The first-write cell's canary: batch 1 is one target, then the rest (one per cluster).
CANARY_TARGETS = 4
CANARY_BATCHES = [1, "100%"]


def measure_first_write(ctx: Context, w: int, runs: int) -> FirstWrite:
    """Enqueue -> the canary's Secret written (the worker's clock when its write returned),
    ``runs`` times with a warm worker; a fresh certificate each run, so each first write is a
    create."""
    from tests.certfactory import make_chain

    result = FirstWrite(path=ctx.path, w=w)
    say(f"{ctx.path} W={w}: first-write latency, {runs} canary runs")
    for attempt in range(runs):
        tag = f"{ctx.path[0]}fw-w{w}-r{attempt}"
        chain = make_chain(cn=f"{tag}.bench.example")
        distribution_id = ctx.driver.distribution(
            CANARY_TARGETS, tag, chain, batch_size=CANARY_BATCHES
        )
        _, (report, enqueued) = ctx.driver.run(distribution_id)
        written = _finished_moments(ctx.pipe, report.id)
        if not written:
            raise RuntimeError(f"first-write run {report.id} wrote nothing: {report.counts()}")
        result.ms.append(round((min(written) - enqueued).total_seconds() * 1000, 1))
    return result


def _probes(
    env: Any, pipe: Any, fleet: Fleet, database_url: str | None, redis_url: str | None
) -> Probes:
    from sqlalchemy import event

    # The benchmark's own polling goes through this engine: count what it costs the
    # database so it can be taken out. (The pool's pre-ping sends an empty query, which
    # pg_stat_statements does not count.)
    own = Counter[str]()
    engine = pipe.runtime.engine
    event.listen(engine, "commit", lambda _: own.update(["xact"]))
    event.listen(engine, "rollback", lambda _: own.update(["xact"]))
    event.listen(engine, "before_cursor_execute", lambda *_: own.update(["statement"]))
    return Probes(
        admin=fleet.admin,
        pg_conninfo=_libpq_url(database_url) if database_url else None,
        redis_url=redis_url,
        bench_transactions=lambda: own["xact"],
        bench_statements=lambda: own["statement"],
        processes=lambda: _component_pids(env, pipe, servers=database_url is not None),
    )


def _warm_up(ctx: Context, w: int) -> None:
    # The workers are a long-running service: measure them warm. SPREAD messages of
    # one target per cluster each (placement is round-robin) let every pool process
    # build its client for, and connect to, every cluster before a measured run.
    from tasks.distribution import SPREAD
    from tests.certfactory import make_chain

    warm_n = min(SPREAD * len(ctx.fleet.clusters), len(ctx.fleet.slots))
    say(f"{ctx.path} N={warm_n} W={w}: warm-up run (not measured)")
    warm = make_chain(cn=f"warm-{ctx.path[0]}w{w}.bench.example")
    ctx.driver.run(ctx.driver.distribution(warm_n, f"warm-{ctx.path[0]}w{w}", warm))


def _cells(ctx: Context, sizes: Sequence[int], workers: Sequence[int], results: Results) -> None:
    options = ctx.options
    for w in workers:
        say(f"{ctx.path}: starting {w} worker process(es), concurrency {options.concurrency} each")
        for index in range(w):
            ctx.pipe.start_worker(
                name=f"{ctx.path[0]}w{w}-{index + 1}", concurrency=options.concurrency
            )
        _warm_up(ctx, w)
        if options.first_write and w == min(workers):
            results.first_writes.append(measure_first_write(ctx, w, options.first_write))
        for n in sizes:
            results.cells.append(measure_cell(ctx, n, w))
            cell = results.cells[-1]
            say(
                f"{ctx.path} N={n} W={w}: pipeline {cell.pipeline_s:.2f}s "
                f"(runs {cell.pipeline_runs}), bare {cell.bare_s:.2f}s (runs {cell.bare_runs}), "
                f"own CPU {cell.own_cpu_runs} bare CPU {cell.bare_cpu_runs}, "
                f"RSS {cell.rss_mb_runs}, re-run {cell.rerun_s:.2f}s, counts {cell.counts}"
            )
        for worker in ctx.pipe.workers:
            worker.stop()
        ctx.pipe.workers.clear()


def run_benchmark(options: Options, env: Any) -> Results:
    """Run every cell of ``options`` on the environment ``env`` (a TestEnvironment)."""
    import redis

    from tests.support.pipeline import pipeline

    workdir = options.workdir or env.workdir / "bench"
    clusters = env.clusters()
    redis_server = env.redis()
    postgres = env.postgres()
    database_url = postgres.create_database("bench")
    redis.Redis.from_url(redis_server.url).flushdb()
    kubectl = find_kubectl(os.environ) if options.kubectl_max else None
    say(f"{len(clusters)} apiservers, Redis, PostgreSQL up; creating namespaces")
    largest = max((*options.sizes, *options.embedded, CANARY_TARGETS))
    fleet = prepare_fleet(clusters, largest, workdir / "kubeconfigs", options.namespaces)
    results = Results()
    with pipeline(database_url, redis_server.url, workdir, extra_env=PRODUCTION_ENV) as pipe:
        probes = _probes(env, pipe, fleet, database_url, redis_server.url)
        driver = PipelineDriver(pipe, fleet)
        started = time.monotonic()
        driver.ensure_targets(largest)
        say(f"{largest} targets created in {time.monotonic() - started:.1f}s")
        context = Context(options, workdir, fleet, pipe, driver, probes, kubectl)
        _cells(context, options.sizes, options.workers, results)
    if options.embedded or options.first_write:
        # The embedded default: no server at all, the files under the data directory.
        data = workdir / "embedded" / "data"
        data.mkdir(parents=True, exist_ok=True)
        with pipeline(
            f"sqlite:///{data}/certautopilot.db",
            f"sqla+sqlite:///{data}/broker.db",
            workdir / "embedded",
            extra_env=PRODUCTION_ENV,
        ) as pipe:
            driver = PipelineDriver(pipe, fleet)
            probes = _probes(env, pipe, fleet, None, None)
            context = Context(options, workdir, fleet, pipe, driver, probes, None, path="embedded")
            _cells(context, options.embedded, (1,), results)
    return results


def save(results: Results, path: Path) -> None:
    """Write the raw results as JSON (for docs/benchmarks.md and comparisons)."""
    path.write_text(json.dumps(asdict(results), indent=2))
