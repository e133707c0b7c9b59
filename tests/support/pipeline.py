"""A real pipeline for integration tests: PostgreSQL + Redis (or the embedded default),
real Celery worker processes, and the backend API driven from the test process."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from models import migrate
from tests.certfactory import Chain, make_chain
from tests.support.workers import WorkerProcess
from worker.app import service
from worker.core.crypto import generate_kek
from worker.platform.celery_app import app, configure
from worker.platform.runtime import Runtime, build_runtime, migration_engine, set_runtime
from worker.platform.settings import Settings, load_settings

#: Short leases so recovery paths (leases, reaper) run within a test's time: a claim holds 5 s
#: unless renewed, a message nobody claimed is re-sent after 20 s. The soft limit is the least
#: these retry settings allow (worker.core.budget: 8 API calls x 16 s, 7 database steps x 2.5 s).
FAST_RECOVERY = {
    "CAP_TASK_TIME_LIMIT": "170",
    "CAP_TASK_SOFT_TIME_LIMIT": "160",
    "CAP_BROKER_VISIBILITY_TIMEOUT": "200",
    "CAP_STALE_AFTER": "5",
    "CAP_RESEND_AFTER": "20",
    "CAP_REAPER_INTERVAL": "1",
    "CAP_KUBE_RETRY_ATTEMPTS": "3",
    "CAP_KUBE_RETRY_MAX_SECONDS": "4",
    "CAP_KUBE_CONNECT_TIMEOUT": "2",
    "CAP_KUBE_READ_TIMEOUT": "10",
}


@dataclass
class Pipeline:
    """The backend (in this process) plus worker processes sharing one configuration."""

    env: dict[str, str]
    settings: Settings
    runtime: Runtime
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, name: str | None = None, concurrency: int = 4) -> WorkerProcess:
        """Start one more worker process and wait until it consumes."""
        worker = WorkerProcess(
            name or f"w{len(self.workers) + 1}", self.env, self.log_dir, concurrency=concurrency
        )
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def enqueue(self, distribution_id: str, action: str, **options: Any) -> str:
        """Queue a run through the same API the scheduler uses."""
        from tasks.distribution import dispatcher

        return service.enqueue_run(self.runtime, dispatcher, distribution_id, action, **options)

    def wait(self, run_id: str, timeout: float = 120.0) -> service.RunReport:
        """Poll the database until the run is final; fail with the worker logs otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = service.run_report(self.runtime, run_id)
            if report.finished:
                return report
            time.sleep(0.2)
        logs = "\n".join(w.log_text()[-3000:] for w in self.workers)
        raise AssertionError(f"run {run_id} not final after {timeout}s: {report}\n{logs}")

    def logs(self) -> str:
        """Every worker's log, concatenated."""
        return "\n".join(worker.log_text() for worker in self.workers)

    def stop(self) -> None:
        """Stop every worker and release the runtime."""
        for worker in self.workers:
            worker.stop()
        self.runtime.close()
        set_runtime(None)


@contextmanager
def pipeline(
    database_url: str, broker_url: str, tmp: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[Pipeline]:
    """Migrate the database, configure this process, and hand out a Pipeline."""
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "CAP_DATA_DIR": str(data_dir),
        "CAP_DATABASE_URL": database_url,
        "CAP_BROKER_URL": broker_url,
        "CAP_RESULT_BACKEND": broker_url
        if broker_url.startswith("redis")
        else f"db+sqlite:///{data_dir}/results.db",
        "CAP_KEK": f"k1:{generate_kek()}",
        "CAP_HEARTBEAT_FILE": str(data_dir / "heartbeat"),
        **FAST_RECOVERY,
        **(extra_env or {}),
    }
    settings = load_settings(env)
    with migration_engine(settings.database.url) as engine:
        migrate.upgrade(engine)
    configure(app, settings)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    made = Pipeline(env=env, settings=settings, runtime=runtime, log_dir=tmp)
    try:
        yield made
    finally:
        made.stop()


@dataclass
class Fleet:
    """Targets spread over clusters, grouped, with a certificate attached."""

    chain: Chain
    certificate_id: str
    target_names: list[str]
    #: target name -> (cluster, namespace, secret name)
    placement: dict[str, tuple[Any, str, str]]
    group_id: str
    distribution_id: str


def build_fleet(
    pipe: Pipeline,
    clusters: Sequence[Any],
    make_service_account: Any,
    *,
    targets: int,
    namespace: str,
    batch_size: Any = None,
    failure_threshold: Any = None,
    store_content: bool = True,
    kubeconfigs: Mapping[str, str] | None = None,
    cn: str = "shop.example.com",
) -> Fleet:
    """Create credentials, targets round-robin over `clusters`, a group and a distribution."""
    rt = pipe.runtime
    credentials: dict[str, str] = {}
    for cluster in clusters:
        kubeconfig = (kubeconfigs or {}).get(cluster.name)
        if kubeconfig is None:
            kubeconfig = make_service_account(cluster, namespace).kubeconfig
        credentials[cluster.name] = service.add_kubeconfig_credential(
            rt, f"{namespace}-{cluster.name}", kubeconfig.encode()
        )
    names: list[str] = []
    placement: dict[str, tuple[Any, str, str]] = {}
    for index in range(targets):
        cluster = clusters[index % len(clusters)]
        name = f"{namespace}-t{index:03d}"
        secret_name = f"site-{index:03d}-tls"
        service.create_target(
            rt,
            service.TargetSpec(
                name=name,
                namespace=namespace,
                credential=credentials[cluster.name],
                secret_name=secret_name,
            ),
            check=False,
        )
        names.append(name)
        placement[name] = (cluster, namespace, secret_name)
    chain = make_chain(cn=cn, fresh_leaf_key=True)
    certificate_id = service.import_certificate(
        rt, chain.leaf_pem, chain.key_pem, chain.chain_pem, chain.root_pem
    )
    group_id = service.create_group(
        rt, f"{namespace}-group", names, batch_size=batch_size, failure_threshold=failure_threshold
    )
    distribution_id = service.attach(
        rt, certificate_id, group=f"{namespace}-group", store_content=store_content
    )
    return Fleet(chain, certificate_id, names, placement, group_id, distribution_id)


def read_secret(admin_api: Any, cluster: Any, namespace: str, name: str) -> k8s.V1Secret | None:
    """Read a Secret as cluster admin (test assertions only); None when absent."""
    api = k8s.CoreV1Api(admin_api(cluster))
    try:
        return api.read_namespaced_secret(name, namespace)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise
