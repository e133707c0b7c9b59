"""The Helm chart on a real node: pods run on kubelet + containerd (tests/testenv/node.py).

The chart is installed with helm into the node cluster, with the project's image (built by
a private dockerd from this checkout, `docker save`d and imported into the node's
containerd; pods use imagePullPolicy: Never). PostgreSQL and Redis run on this host's
interface address, where pods reach them. Nothing is mocked: probes, securityContext, the
read-only root, the projected service-account token, the chart's Role, the migration hook,
kubelet's Secret volume sync, pod replacement and rolling upgrades are the real ones.

Timings (helm install, Secret volume sync delays, ...) are printed at the end of the module.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from tests.certfactory import make_chain
from tests.support.phases import PhaseLog, uncaptured
from tests.testenv.access import admin_api_client
from tests.testenv.helm import find_helm
from tests.testenv.node import Node, export_worker_image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "certautopilot-k8s-worker"
IMAGE_REPOSITORY = "certautopilot-k8s-worker"
IMAGE_TAG = "node"
RELEASE = "cap"
RELEASE_NAMESPACE = "cap-system"
TARGET_NAMESPACE = "edge"
OUTSIDE_NAMESPACE = "outside"
KEK = "k1:" + base64.b64encode(bytes(range(32))).decode()
FLOWER_LOGIN = "admin:" + uuid.uuid4().hex
PHASES = PhaseLog("node phase")


# --------------------------------------------------------------------------- fixtures


@dataclass
class Release:
    """The installed chart and what the tests need to drive it."""

    node: Node
    api: k8s.ApiClient
    helm: list[str]
    values_file: Path
    cli_env: dict[str, str]
    database_url: str  # host-side, for direct reads

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)

    @property
    def apps(self) -> k8s.AppsV1Api:
        return k8s.AppsV1Api(self.api)

    def helm_run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.helm, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"helm {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def cli(self, *args: str, check: bool = True) -> str:
        """`certautopilot ARGS` on the host, against the release's database and broker."""
        binary = Path(sys.executable).with_name("certautopilot")
        done = subprocess.run(
            [str(binary), *args], env=self.cli_env, capture_output=True, text=True,
            timeout=600, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"certautopilot {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout + done.stderr

    def worker_pods(self) -> list[k8s.V1Pod]:
        pods = self.core.list_namespaced_pod(
            RELEASE_NAMESPACE, label_selector="app.kubernetes.io/component=worker"
        ).items
        return [p for p in pods if p.metadata.deletion_timestamp is None]

    def ready_worker(self) -> k8s.V1Pod:
        for pod in self.worker_pods():
            if pod_ready(pod):
                return pod
        raise AssertionError("no Ready worker pod")

    def exec(self, namespace: str, pod: str, argv: list[str]) -> tuple[int, str]:
        """Run `argv` in the pod's first container (kubectl exec): (exit status, output)."""
        session = stream(
            self.core.connect_get_namespaced_pod_exec, pod, namespace, command=argv,
            stderr=True, stdin=False, stdout=True, tty=False, _preload_content=False,
        )  # fmt: skip
        output = []
        deadline = time.monotonic() + 600
        while session.is_open() and time.monotonic() < deadline:
            session.update(timeout=1)
            output.append(session.read_stdout())
            output.append(session.read_stderr())
        session.close()
        status = session.returncode
        return (status if status is not None else -1), "".join(output)

    def run_state(self, run_id: str) -> tuple[str, int]:
        """(run state, targets finished) straight from the database."""
        with psycopg.connect(self.database_url, autocommit=True) as connection:
            row = connection.execute(
                "SELECT state, (SELECT count(*) FROM target_results r WHERE r.run_id = runs.id "
                "AND r.status NOT IN ('pending', 'running')) FROM runs WHERE id = %s",
                (run_id,),
            ).fetchone()
        assert row is not None, run_id
        return str(row[0]), int(row[1])


def pod_ready(pod: k8s.V1Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def pod_memory_peak(node: Node, pod: k8s.V1Pod) -> int | None:
    """The most memory the pod's cgroup ever charged (cgroup v1), or None if not found."""
    for hierarchy in ("memory", "memory,memsw"):
        root = Path("/sys/fs/cgroup") / hierarchy / node.cgroup_root.lstrip("/") / "kubepods"
        for folder in root.glob(f"**/pod{pod.metadata.uid}"):
            return int((folder / "memory.max_usage_in_bytes").read_text())
    return None


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float = 1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(every)


@pytest.fixture(scope="module")
def worker_image(node: Node, pytestconfig: pytest.Config) -> str:
    """The project's image, built from this checkout and imported into the node."""
    given = os.environ.get("CAP_NODE_WORKER_IMAGE")
    if given:
        # A `docker save` tarball of this image made elsewhere (tag IMAGE_REPOSITORY:IMAGE_TAG).
        archive = Path(given)
        assert archive.is_file(), f"CAP_NODE_WORKER_IMAGE={given} is not a file"
    else:
        with uncaptured(pytestconfig), PHASES.timed("worker image: docker build + save (cached)"):
            archive = export_worker_image(REPO, f"{IMAGE_REPOSITORY}:{IMAGE_TAG}", os.environ)
    PHASES.facts["worker image"] = f"{archive} ({archive.stat().st_size / 1e6:.0f} MB)"
    with PHASES.timed("worker image: ctr import into the node"):
        node.import_image(archive)
    return f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"


@pytest.fixture(scope="module")
def release(
    node: Node, worker_image: str, tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Release]:  # fmt: skip
    """`helm install --wait` of the chart with the project's image, PostgreSQL and Redis."""
    with uncaptured(pytestconfig):
        helm_binary = find_helm(os.environ)
    home = tmp_path_factory.mktemp("helm-home")
    helm = [
        str(helm_binary), "--kubeconfig", str(node.kubeconfig_path),
        "--namespace", RELEASE_NAMESPACE,
    ]  # fmt: skip
    helm += ["--registry-config", str(home / "registry.json"),
             "--repository-cache", str(home / "cache"),
             "--repository-config", str(home / "repositories.yaml")]  # fmt: skip
    cluster = node.cluster
    assert cluster is not None
    api = admin_api_client(cluster)
    # The exec websocket reads the CA from a file only (it ignores ca_cert_data).
    api.configuration.ssl_ca_cert = str(cluster.ca_file)
    core = k8s.CoreV1Api(api)
    for namespace in (RELEASE_NAMESPACE, TARGET_NAMESPACE, OUTSIDE_NAMESPACE):
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    database = node.postgres.create_database("cap")
    name = database.rsplit("/", 1)[1]
    pod_database = node.postgres.url(name, host=node.address)
    broker = node.redis.url  # on the host's interface, with a password
    values = {
        "image": {"repository": IMAGE_REPOSITORY, "tag": IMAGE_TAG, "pullPolicy": "Never"},
        "secret": {
            "kek": KEK,
            "databaseUrl": pod_database,
            "brokerUrl": broker,
            "resultBackend": broker.rsplit("/", 1)[0] + "/1",
        },
        # The chart's own probes, resources and security context: only the replica count set.
        "worker": {"replicaCount": 2},
        "config": {"reaperInterval": 5, "staleAfter": 30},
        "flower": {"enabled": True, "basicAuth": FLOWER_LOGIN},
        "rbac": {"targetNamespaces": [TARGET_NAMESPACE]},
    }
    values_file = tmp_path_factory.mktemp("values") / "values.yaml"
    values_file.touch(mode=0o600)
    values_file.write_text(yaml.safe_dump(values))
    host_database = database
    cli_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "CAP_DATABASE_URL": host_database,
        "CAP_BROKER_URL": broker,
        "CAP_RESULT_BACKEND": values["secret"]["resultBackend"],  # type: ignore[index]
        "CAP_KEK": KEK,
        "CAP_DATA_DIR": str(tmp_path_factory.mktemp("cli-data")),
    }
    made = Release(node, api, helm, values_file, cli_env,
                   host_database.replace("postgresql+psycopg://", "postgresql://"))  # fmt: skip
    with PHASES.timed("helm install --wait (hook Job, 2 workers, Flower)"):
        made.helm_run(
            "install", RELEASE, str(CHART), "--values", str(values_file),
            "--wait", "--timeout", "10m",
        )  # fmt: skip
    try:
        yield made
    finally:
        for pod in made.worker_pods():
            peak = pod_memory_peak(node, pod)
            if peak is not None:
                PHASES.facts[f"memory peak of worker pod {pod.metadata.name}"] = (
                    f"{peak / 2**20:.0f} MiB"
                )
        PHASES.report(
            pytestconfig,
            [f"start {what}: {seconds:.1f}s" for what, seconds in node.timings.items()],
        )
        api.close()  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- 1: install


def test_install_runs_the_hook_the_probes_and_flower_on_a_real_node(release: Release) -> None:
    # The pre-install hook Job ran the migration: helm waits for it, deletes it on success,
    # and the database is at the newest revision.
    jobs = k8s.BatchV1Api(release.api).list_namespaced_job(RELEASE_NAMESPACE).items
    assert jobs == [], [j.metadata.name for j in jobs]  # hook-succeeded: deleted
    with psycopg.connect(release.database_url) as connection:
        (revision,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision
    events = release.core.list_namespaced_event(RELEASE_NAMESPACE).items
    assert any(e.involved_object.kind == "Job" and e.reason == "Completed" for e in events), [
        (e.involved_object.kind, e.reason) for e in events
    ]

    # Both workers are Ready through their real exec probes, never restarted.
    deployment = release.apps.read_namespaced_deployment(
        f"{RELEASE}-certautopilot-k8s-worker", RELEASE_NAMESPACE
    )
    assert deployment.status.ready_replicas == 2
    pods = release.worker_pods()
    assert len(pods) == 2 and all(pod_ready(p) for p in pods)
    for pod in pods:
        (status,) = pod.status.container_statuses
        assert status.ready and status.restart_count == 0, status
        assert pod.spec.node_name == "cap-node"
        context = pod.spec.containers[0].security_context
        assert context.read_only_root_filesystem and not context.allow_privilege_escalation
        # The kernel enforces it: uid 10001, the root read-only, /tmp and the data folder not.
        status_code, output = release.exec(
            RELEASE_NAMESPACE, pod.metadata.name,
            ["sh", "-c", "id -u; id -G; touch /opt/x 2>&1; touch /tmp/x /var/lib/certautopilot/x"
             " && echo writable; grep -c . /proc/self/status >/dev/null; "
             "grep CapEff /proc/self/status; certautopilot probe readiness"],
        )  # fmt: skip
        lines = output.splitlines()
        assert status_code == 0, output
        assert lines[0] == "10001", output
        assert "Read-only file system" in output and "writable" in output, output
        assert "CapEff:\t0000000000000000" in output, output

    # Flower answers behind its login, through its Service (kube-proxy's ClusterIP rule).
    (service,) = release.core.list_namespaced_service(
        RELEASE_NAMESPACE, label_selector="app.kubernetes.io/component=flower"
    ).items
    url = f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}/"
    wait_for("Flower's Service answering", lambda: _http_status(url) == 401, 120)
    assert _http_status(url, FLOWER_LOGIN) == 200


def _http_status(url: str, login: str | None = None) -> int:
    request = urllib.request.Request(url)  # noqa: S310 (an http:// URL built above)
    if login is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (pod network)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


# --------------------------------------------------------------------------- 2: in-cluster


def _import_certificate(release: Release, tmp: Path, cn: str) -> dict[str, Any]:
    chain = make_chain(cn=cn, intermediates=1)
    files = {}
    for name, data in (("cert", chain.leaf_pem), ("chain", chain.chain_pem),
                       ("key", chain.key_pem)):  # fmt: skip
        path = tmp / f"{cn}-{name}.pem"
        path.touch(mode=0o600)
        path.write_bytes(data)
        files[name] = str(path)
    imported = release.cli("certs", "import", "--cert", files["cert"], "--key", files["key"],
                           "--chain", files["chain"], "-o", "json")  # fmt: skip
    for path in files.values():
        Path(path).unlink()
    return {"cert": json.loads(imported), "chain": chain}


def _in_pod(release: Release, script: str) -> str:
    """A shell script in a Ready worker pod (where in-cluster mode is available)."""
    pod = release.ready_worker().metadata.name
    status, output = release.exec(RELEASE_NAMESPACE, pod, ["sh", "-c", script])
    if status != 0:
        found = release.core.read_namespaced_pod(pod, RELEASE_NAMESPACE)
        events = release.core.list_namespaced_event(
            RELEASE_NAMESPACE, field_selector=f"involvedObject.name={pod}"
        ).items
        raise AssertionError(
            f"exit {status} in {pod}: {output}\n{found.status.container_statuses}\n"
            + "\n".join(f"{e.reason}: {e.message}" for e in events)
        )
    return output


def test_in_cluster_mode_writes_with_the_projected_token_and_the_charts_role(
    release: Release, tmp_path: Path
) -> None:
    added = _in_pod(release, f"certautopilot targets add edge-app --namespace {TARGET_NAMESPACE}"
                             " --in-cluster --secret-name edge-app-tls")  # fmt: skip
    assert "health: healthy" in added, added
    # Saved, and exit 1 (`targets add` fails on an unhealthy check): the shell says so.
    outside = _in_pod(
        release, f"certautopilot targets add outside-app --namespace {OUTSIDE_NAMESPACE} "
        "--in-cluster --secret-name outside-app-tls; echo \"exit $?\"",
    )  # fmt: skip
    # The Role exists in rbac.targetNamespaces only: elsewhere the spec's forbidden message.
    assert "forbidden: namespaces cannot be read" in outside, outside
    assert outside.rstrip().endswith("exit 1"), outside

    imported = _import_certificate(release, tmp_path, "edge.example.com")
    for target in ("edge-app", "outside-app"):
        attached = json.loads(release.cli(
            "distributions", "attach", imported["cert"]["id"], "--target", target,
            "-o", "json",
        ))  # fmt: skip
        executed = release.cli("run", attached["id"], "--execute", check=False)
        if target == "edge-app":
            assert "succeeded: 1 created" in executed or "succeeded: 1" in executed, executed
        else:
            assert re.search(r"forbidden: secrets cannot be \w+", executed), executed
    secret = release.core.read_namespaced_secret("edge-app-tls", TARGET_NAMESPACE)
    assert secret.type == "kubernetes.io/tls"
    assert base64.b64decode(secret.data["tls.crt"]) == imported["chain"].fullchain_pem
    # Written by the worker's ServiceAccount (its projected token), not by an admin.
    managers = {entry.manager for entry in secret.metadata.managed_fields or []}
    assert managers, secret.metadata
    with pytest.raises(ApiException) as missing:
        release.core.read_namespaced_secret("outside-app-tls", OUTSIDE_NAMESPACE)
    assert missing.value.status == 404
    # The worker pods' token is a projected, expiring one (not a legacy Secret token).
    pod = release.ready_worker()
    projected = [v for v in pod.spec.volumes if v.projected is not None]
    assert any(
        s.service_account_token is not None for v in projected for s in v.projected.sources
    ), pod.spec.volumes


# --------------------------------------------------------------------------- 3: volume sync


def test_a_pod_mounting_the_secret_sees_the_new_certificate(
    release: Release, tmp_path: Path
) -> None:
    _in_pod(release, f"certautopilot targets add sync-app --namespace {TARGET_NAMESPACE} "
                     "--in-cluster --secret-name sync-app-tls")  # fmt: skip
    first = _import_certificate(release, tmp_path, "sync.example.com")
    attached = json.loads(release.cli(
        "distributions", "attach", first["cert"]["id"], "--target", "sync-app", "-o", "json",
    ))  # fmt: skip
    release.cli("run", attached["id"], "--execute")
    consumer = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="consumer"),
        spec=k8s.V1PodSpec(
            containers=[k8s.V1Container(
                name="consumer", image=f"{IMAGE_REPOSITORY}:{IMAGE_TAG}",
                image_pull_policy="Never",
                command=["sh", "-c", "exec sleep 100000"],
                volume_mounts=[k8s.V1VolumeMount(name="tls", mount_path="/certs",
                                                 read_only=True)],
                security_context=k8s.V1SecurityContext(
                    run_as_non_root=True, run_as_user=10001,
                    read_only_root_filesystem=True, allow_privilege_escalation=False,
                    capabilities=k8s.V1Capabilities(drop=["ALL"]),
                ),
            )],
            volumes=[k8s.V1Volume(name="tls", secret=k8s.V1SecretVolumeSource(
                secret_name="sync-app-tls"))],
            termination_grace_period_seconds=1,
            automount_service_account_token=False,
        ),
    )  # fmt: skip
    release.core.create_namespaced_pod(TARGET_NAMESPACE, consumer)
    wait_for(
        "the consumer pod Ready",
        lambda: pod_ready(release.core.read_namespaced_pod("consumer", TARGET_NAMESPACE)),
        120,
    )

    def mounted() -> bytes:
        status, output = release.exec(TARGET_NAMESPACE, "consumer", ["cat", "/certs/tls.crt"])
        return output.encode() if status == 0 else b""

    assert mounted() == first["chain"].fullchain_pem
    delays = []
    for round_ in range(2):
        renewed = _import_certificate(release, tmp_path, "sync.example.com")
        attached = json.loads(release.cli(
            "distributions", "attach", renewed["cert"]["id"], "--target", "sync-app",
            "-o", "json",
        ))  # fmt: skip
        release.cli("run", attached["id"], "--execute")
        secret = release.core.read_namespaced_secret("sync-app-tls", TARGET_NAMESPACE)
        assert base64.b64decode(secret.data["tls.crt"]) == renewed["chain"].fullchain_pem
        # When the API server stored the new Secret (its managedFields time, 1 s resolution).
        written = max(entry.time for entry in secret.metadata.managed_fields)
        wait_for(
            "the mounted file showing the new certificate",
            lambda chain=renewed["chain"]: mounted() == chain.fullchain_pem,
            240, every=0.5,
        )  # fmt: skip
        seen = datetime.datetime.now(datetime.UTC)
        delays.append((seen - written).total_seconds())
        PHASES.facts[f"Secret volume sync delay, update {round_ + 1}"] = (
            f"{delays[-1]:.0f}s (kubelet syncFrequency {release.node.sync_frequency}s)"
        )
    release.core.delete_namespaced_pod("consumer", TARGET_NAMESPACE, grace_period_seconds=0)
    # Bounded by one kubelet sync plus its cache's propagation, never instant-by-assumption.
    assert all(0 <= d <= release.node.sync_frequency * 2 + 30 for d in delays), delays


# --------------------------------------------------------------------------- 4: disruption


def _fan_out(release: Release, prefix: str, count: int, tmp: Path) -> tuple[str, Any]:
    """`count` in-cluster targets in one group of batches of one, a certificate attached to
    it; return (distribution id, chain)."""
    _in_pod(release, f"for i in $(seq 0 {count - 1}); do certautopilot targets add {prefix}$i "
                     f"--namespace {TARGET_NAMESPACE} --in-cluster --secret-name {prefix}$i-tls"
                     " --no-check >/dev/null || exit 1; done")  # fmt: skip
    imported = _import_certificate(release, tmp, f"{prefix}.example.com")
    targets: list[str] = []
    for index in range(count):
        targets += ["--target", f"{prefix}{index}"]
    release.cli("groups", "create", prefix, *targets, "--batch-size", "1")
    attached = json.loads(release.cli(
        "distributions", "attach", imported["cert"]["id"], "--group", prefix, "-o", "json",
    ))  # fmt: skip
    return attached["id"], imported["chain"]


def _start_run(release: Release, distribution_id: str) -> str:
    queued = json.loads(release.cli("run", distribution_id, "--execute", "--no-wait", "-o", "json"))
    return str(queued["run_id"])


def _finish(release: Release, run_id: str, count: int, prefix: str, chain: Any) -> None:
    wait_for("the run finishing", lambda: release.run_state(run_id)[0] != "running", 600)
    assert release.run_state(run_id) == ("succeeded", count)
    # No worker container restarted meanwhile (an OOM kill or a failed liveness probe would).
    for pod in release.worker_pods():
        for status in pod.status.container_statuses or []:
            assert status.restart_count == 0, (pod.metadata.name, status.last_state)
    for index in range(count):
        secret = release.core.read_namespaced_secret(f"{prefix}{index}-tls", TARGET_NAMESPACE)
        assert base64.b64decode(secret.data["tls.crt"]) == chain.fullchain_pem


def test_a_deleted_worker_pod_is_replaced_and_the_run_finishes(
    release: Release, tmp_path: Path
) -> None:
    count = 30
    distribution_id, chain = _fan_out(release, "del", count, tmp_path)
    run_id = _start_run(release, distribution_id)
    wait_for("the run starting", lambda: release.run_state(run_id)[1] >= 1, 120, every=0.1)
    before = {p.metadata.name for p in release.worker_pods()}
    victim = sorted(before)[0]
    with PHASES.timed("worker pod deleted mid-run -> replaced -> run finished"):
        release.core.delete_namespaced_pod(victim, RELEASE_NAMESPACE)  # kubectl delete pod
        state, done = release.run_state(run_id)
        assert state == "running" and done < count, (state, done)
        _finish(release, run_id, count, "del", chain)
        wait_for(
            "a replacement worker Ready",
            lambda: len([p for p in release.worker_pods() if pod_ready(p)
                         and p.metadata.name not in before]) >= 1,
            300,
        )  # fmt: skip
    assert victim not in {p.metadata.name for p in release.worker_pods()}


def test_helm_upgrade_rolls_the_workers_without_losing_a_run(
    release: Release, tmp_path: Path
) -> None:
    count = 30
    before = {p.metadata.name for p in release.worker_pods()}
    distribution_id, chain = _fan_out(release, "upg", count, tmp_path)
    with PHASES.timed("helm upgrade (config.logLevel) during a run -> rolled -> run finished"):
        # A changed value changes the ConfigMap, whose checksum rolls the Deployment.
        upgrade = subprocess.Popen(
            [*release.helm, "upgrade", RELEASE, str(CHART), "--values", str(release.values_file),
             "--set", "config.logLevel=DEBUG", "--wait", "--timeout", "10m"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # The run starts when the first new worker is Ready: the rollout (maxSurge 1,
        # maxUnavailable 0) then stops an old worker at once, and the second one after the
        # next new worker is Ready, while the run goes on.
        wait_for(
            "a new worker pod Ready",
            lambda: any(pod_ready(p) and p.metadata.name not in before
                        for p in release.worker_pods()),
            600, every=0.2,
        )  # fmt: skip
        run_id = _start_run(release, distribution_id)
        seen_during_run: set[str] = set()
        while release.run_state(run_id)[0] == "running":
            seen_during_run |= {p.metadata.name for p in release.worker_pods()}
            time.sleep(0.2)
        output, _ = upgrade.communicate(timeout=900)
        assert upgrade.returncode == 0, output
        _finish(release, run_id, count, "upg", chain)
    after = {p.metadata.name for p in release.worker_pods() if pod_ready(p)}
    assert len(after) == 2 and not after & before, (before, after)
    # The roll happened during the run: workers it started and workers it stopped both served.
    assert seen_during_run & before and seen_during_run - before, (seen_during_run, before)
    config = release.core.read_namespaced_config_map(
        f"{RELEASE}-certautopilot-k8s-worker", RELEASE_NAMESPACE
    )
    assert config.data["CAP_LOG_LEVEL"] == "DEBUG"
