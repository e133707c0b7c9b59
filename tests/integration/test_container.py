"""The image, the compose stack and the exported image, on a real Docker engine.

Everything runs for real: tests/testenv/docker.py starts dockerd (Debian's docker.io) on a
private socket, builds the base images from Debian packages (Docker Hub is unreachable here),
and Compose v2 drives docker-compose.yml from a copy of the repository's tracked files (a
fresh clone's content) with only the values .env.example documents. The containers use the
host's network (the engine creates no bridge and no iptables rule), so they reach the test
apiservers on 127.0.0.1.

Timings of each step (cold: no cache; warm: the engine's image store and the build cache kept
in ~/.cache/certautopilot) are printed at the end of the module, with the image size and
the path of the exported image.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.certfactory import make_chain
from tests.support.phases import PhaseLog
from tests.testenv import Cluster, ServiceAccountAccess
from tests.testenv.docker import (
    COMPOSE_VERSION,
    DockerEngine,
    cache_root,
    ensure_base_images,
    find_compose,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
HOST_NETWORK_OVERRIDE = REPO / "tests" / "testenv" / "compose.host-network.yml"
IMAGE = "certautopilot-k8s-worker:ci"
APP_UID = "10001"
PHASES = PhaseLog("container phase")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[DockerEngine]:
    """dockerd for this module; afterwards the host must be exactly as it was found."""
    with PHASES.timed("compose v2 (build once from the Go module proxy)"):
        find_compose(os.environ)
    engine = DockerEngine(
        tmp_path_factory.mktemp("docker"), data_root=cache_root(os.environ) / "docker"
    )
    with PHASES.timed("dockerd start"):
        engine.start()
    try:
        yield engine
    finally:
        with PHASES.timed("dockerd stop"):
            engine.stop()
        PHASES.report(
            pytestconfig,
            ["host left as found (links, iptables, nat, mounts): "
             + ("yes" if not engine.host_changes else f"NO: {engine.host_changes}")],
        )  # fmt: skip
    assert engine.host_changes == {}, f"the engine changed the host: {engine.host_changes}"


@pytest.fixture(scope="module")
def base_images(engine: DockerEngine) -> dict[str, str]:
    """PYTHON_IMAGE, REDIS_IMAGE and POSTGRES_IMAGE: local images from Debian packages."""
    with PHASES.timed("base images (debootstrap + docker import; cached by recipe hash)"):
        return ensure_base_images(engine, os.environ)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's tracked files, as a fresh clone has them (no .env, venv or cache)."""
    tree = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = REPO / relative
        if source.is_file():  # a file deleted in the work tree but not yet in git
            target = tree / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return tree


@pytest.fixture(scope="module")
def image(engine: DockerEngine, base_images: dict[str, str], source_tree: Path) -> str:
    """The worker image, built from the Dockerfile with the classic builder."""
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with PHASES.timed("image build (docker build, classic builder)"):
        engine.docker(
            "build", "--network", "host",
            "--build-arg", f"PYTHON_IMAGE={base_images['PYTHON_IMAGE']}",
            "--build-arg", f"REVISION={revision}",
            "--build-arg", "SOURCE=file://" + str(REPO),
            "--tag", IMAGE, str(source_tree),
            timeout=1500,
        )  # fmt: skip
    # The classic builder's cache is its untagged stage images: keep a week of them (a prune
    # of all would empty the cache of the dependency stage and rebuild it every run).
    engine.docker("image", "prune", "--force", "--filter", "until=168h")
    size = int(engine.docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    PHASES.facts["image size"] = f"{size / 1e6:.0f} MB ({size} bytes)"
    return IMAGE


def run_image(
    engine: DockerEngine, image: str, *args: str, env: dict[str, str] | None = None,
    entrypoint: str | None = None, check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`docker run` the image the way the chart and compose run it: read-only, uid 10001."""
    argv = [
        "run", "--rm", "--read-only", "--network", "host",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
        "--tmpfs", "/tmp",
        "--tmpfs", f"/var/lib/certautopilot:uid={APP_UID},gid={APP_UID},mode=0700",
    ]  # fmt: skip
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint]
    return engine.docker(*argv, image, *args, check=check, timeout=300)


# --------------------------------------------------------------------------- the image


def test_image_runs_as_10001_on_a_read_only_root_and_holds_only_the_runtime(
    engine: DockerEngine, image: str
) -> None:
    config = json.loads(engine.docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{APP_UID}:{APP_UID}"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert re.fullmatch(r"[0-9a-f]{40}", labels["org.opencontainers.image.revision"])
    assert labels["org.opencontainers.image.source"]

    ids = run_image(engine, image, "-c", "id -u; id -g", entrypoint="sh", check=True)
    assert ids.stdout.split() == [APP_UID, APP_UID]
    written = run_image(engine, image, "-c", "touch /opt/certautopilot/x", entrypoint="sh")
    assert written.returncode != 0 and "Read-only file system" in written.stderr

    helped = run_image(engine, image, "--help", check=True)
    assert "Usage" in helped.stdout and "worker" in helped.stdout

    # No compiler, no pip (neither the system's nor the virtualenv's, nor ensurepip's wheels),
    # no source tree and no test code.
    survey = run_image(
        engine, image, "-c",
        "for tool in gcc cc c++ g++ clang make pip pip3 pip3.11; do "
        "  command -v $tool && echo FOUND-$tool; done; "
        "python -m pip --version >/dev/null 2>&1 && echo FOUND-python-m-pip; "
        "python3 -m pip --version >/dev/null 2>&1 && echo FOUND-python3-m-pip; "
        "ls /usr/share/python-wheels 2>/dev/null | sed 's/^/FOUND-wheel-/'; "
        "ls -d /src /wheels /opt/build 2>/dev/null | sed 's/^/FOUND-/'; "
        "find / -xdev \\( -name conftest.py -o -name testenv -o -name 'test_container.py' "
        "  -o -name requirements.lock \\) 2>/dev/null | sed 's/^/FOUND-/'; "
        "python -c 'import tests' 2>/dev/null && echo FOUND-tests-package; "
        "python -c 'import worker, tasks, models; print(\"IMPORTS-OK\")'",
        entrypoint="sh",
    )  # fmt: skip
    assert "IMPORTS-OK" in survey.stdout, survey.stderr
    assert "FOUND" not in survey.stdout, survey.stdout


def test_probes_work_inside_the_image(
    engine: DockerEngine, image: str, postgres_url: str, redis_url: str
) -> None:
    env = {
        "CAP_DATABASE_URL": postgres_url,
        "CAP_BROKER_URL": redis_url,
        "CAP_RESULT_BACKEND": redis_url,
        "CAP_KEK": "k1:" + base64.b64encode(os.urandom(32)).decode(),
    }
    # Liveness reads the heartbeat: absent in a fresh container, fresh once written.
    dead = run_image(engine, image, "probe", "liveness", env=env)
    assert dead.returncode == 1 and "no heartbeat file" in dead.stdout + dead.stderr
    alive = run_image(
        engine, image, "-c", "touch /var/lib/certautopilot/worker-heartbeat && "
        "certautopilot probe liveness", env=env, entrypoint="sh",
    )  # fmt: skip
    assert alive.returncode == 0 and "alive" in alive.stdout, alive.stderr
    # Readiness checks the database schema and the broker: not ready before the migration.
    unready = run_image(engine, image, "probe", "readiness", env=env)
    assert unready.returncode == 1 and "certautopilot migrate" in unready.stdout + unready.stderr
    run_image(engine, image, "migrate", env=env, check=True)
    ready = run_image(engine, image, "probe", "readiness", env=env)
    assert ready.returncode == 0 and "ready" in ready.stdout, ready.stderr


def test_image_exports_to_a_tarball_containerd_imports(engine: DockerEngine, image: str) -> None:
    export = cache_root(os.environ) / "images" / "certautopilot-k8s-worker-ci.tar"
    export.parent.mkdir(parents=True, exist_ok=True)
    with PHASES.timed("docker save"):
        engine.docker("save", "--output", str(export), image, timeout=600)
    PHASES.facts["exported image (docker save; `ctr -n k8s.io images import` reads it)"] = (
        f"{export} ({export.stat().st_size / 1e6:.0f} MB)"
    )
    # The engine's own containerd, in the namespace the kubelet uses: the import a node does.
    ctr = ["ctr", "--address", str(engine.exec_root / "containerd" / "containerd.sock"),
           "--namespace", "k8s.io"]  # fmt: skip
    with PHASES.timed("ctr images import"):
        imported = subprocess.run(
            [*ctr, "images", "import", str(export)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    listed = subprocess.run(
        [*ctr, "images", "list", "--quiet"], capture_output=True, text=True, check=True
    ).stdout.split()
    reference = f"docker.io/library/{IMAGE}"
    try:
        assert reference in listed
    finally:
        subprocess.run([*ctr, "images", "remove", reference], capture_output=True, check=False)


# --------------------------------------------------------------------------- compose


class ComposeStack:
    """`docker compose` on a copy of the repository, with the host-network override."""

    def __init__(self, engine: DockerEngine, folder: Path, binary: Path) -> None:
        self.engine = engine
        self.folder = folder
        self.binary = binary
        self.project = f"cap{uuid.uuid4().hex[:6]}"
        # Compose prefers the shell's variables to .env: only .env may configure the stack,
        # as on a user's machine (the test runner's own CAP_* settings stay out).
        self.environment = {
            key: value for key, value in engine.env.items()
            if not key.startswith(("CAP_", "FLOWER_", "POSTGRES_", "REDIS_", "COMPOSE_"))
            and key != "PYTHON_IMAGE"
        }  # fmt: skip

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [
                str(self.binary), "--project-name", self.project,
                "--file", "docker-compose.yml", "--file", str(HOST_NETWORK_OVERRIDE), *args,
            ],
            cwd=self.folder, env=self.environment, input=input, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
        return done

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """`certautopilot ARGS` in the running worker container (`docker compose exec`)."""
        done = self("exec", "-T", "worker", "certautopilot", *args, input=input, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"certautopilot {args} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done.stdout

    def containers(self, service: str) -> list[dict[str, Any]]:
        listed = self("ps", "--all", "--format", "json", service).stdout
        rows = [json.loads(line) for line in listed.splitlines() if line.strip()]
        return [row for batch in rows for row in (batch if isinstance(batch, list) else [batch])]

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "200", check=False).stdout


def documented_secret_commands() -> str:
    """The shell lines between BEGIN SECRETS and END SECRETS in .env.example."""
    text = (REPO / ".env.example").read_text()
    block = text.split("# BEGIN SECRETS\n", 1)[1].split("# END SECRETS", 1)[0]
    return "\n".join(line.removeprefix("#").strip() for line in block.splitlines())


@pytest.fixture(scope="module")
def stack(
    engine: DockerEngine, image: str, base_images: dict[str, str], source_tree: Path
) -> Iterator[ComposeStack]:
    """`docker compose up` with the documented .env and secret files; `down -v` afterwards."""
    binary = find_compose(os.environ)
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    assert version.lstrip("v") == COMPOSE_VERSION
    folder = source_tree
    shutil.copy(folder / ".env.example", folder / ".env")
    with (folder / ".env").open("a") as env:
        # Only variables .env.example documents: the local images, and a reaper quick enough
        # for a test (a killed worker's targets are resumed after CAP_STALE_AFTER seconds).
        # CAP_RESEND_AFTER too: a message the killed worker had taken but not yet claimed is
        # re-sent after it (300 s by default, longer than the test's 240 s wait).
        for key, value in {**base_images, "CAP_IMAGE": image, "CAP_REAPER_INTERVAL": "5",
                           "CAP_STALE_AFTER": "20", "CAP_RESEND_AFTER": "30"}.items():  # fmt: skip
            env.write(f"{key}={value}\n")
    subprocess.run(["bash", "-euc", documented_secret_commands()], cwd=folder, check=True)
    compose = ComposeStack(engine, folder, binary)
    try:
        with PHASES.timed("compose up (until the worker is healthy)"):
            compose("up", "--detach", "--wait", "--wait-timeout", "240", timeout=300)
        yield compose
    finally:
        logs = compose.logs()
        with PHASES.timed("compose down"):
            compose("down", "--volumes", "--timeout", "10", check=False)
        (engine.workdir / "compose.log").write_text(logs)


def test_compose_starts_migrates_once_and_the_worker_becomes_healthy(
    stack: ComposeStack,
) -> None:
    (migrate,) = stack.containers("migrate")
    assert (migrate["State"], migrate["ExitCode"]) == ("exited", 0)
    workers = stack.containers("worker")
    assert [w["Health"] for w in workers] == ["healthy"]
    # The heartbeat is written by uid 10001 into the tmpfs compose gives it.
    probe = stack("exec", "-T", "worker", "certautopilot", "probe", "liveness")
    assert "alive" in probe.stdout
    ready = stack("exec", "-T", "worker", "certautopilot", "probe", "readiness")
    assert "ready" in ready.stdout
    # No secret reached the environment of any of our containers.
    environment = stack("exec", "-T", "worker", "env").stdout
    for variable in ("CAP_KEK=", "CAP_DATABASE_URL=", "FLOWER_BASIC_AUTH="):
        assert variable not in environment
    # Restarting the stack does not migrate again (one-shot, restart: "no").
    stack("up", "--detach", "--wait", "--wait-timeout", "120", timeout=180)
    (again,) = stack.containers("migrate")
    assert again["ID"] == migrate["ID"]


def test_flower_answers_only_behind_its_login(stack: ComposeStack) -> None:
    login = (stack.folder / "secrets" / "flower_basic_auth").read_text().strip()
    url = "http://127.0.0.1:5555/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        assert response.status == 200


def _secret(api: Any, namespace: str, name: str) -> Any:
    try:
        return k8s.CoreV1Api(api).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_distribution_dry_run_execute_and_rollback_through_the_containers(
    stack: ComposeStack,
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    testenv_admin_api: Callable[[Cluster], Any],
) -> None:
    namespace = f"compose-{uuid.uuid4().hex[:8]}"
    access = make_service_account(cluster, namespace)
    admin = testenv_admin_api(cluster)
    # What the Secret holds before our write: the rollback restores it.
    original = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="shop-example-com-tls"),
        type="kubernetes.io/tls",
        data={"tls.crt": base64.b64encode(b"old-cert").decode(),
              "tls.key": base64.b64encode(b"old-key").decode()},
    )  # fmt: skip
    k8s.CoreV1Api(admin).create_namespaced_secret(namespace, original)
    chain = make_chain(cn="shop.example.com", intermediates=1)

    with PHASES.timed("distribution through the containers (dry-run, execute, rollback)"):
        stack.cli("credentials", "add-kubeconfig", "c1", "--stdin", input=access.kubeconfig)
        cert = json.loads(_import_cert(stack, chain))
        # The Secret exists and is not ours yet: the target may adopt it (its previous
        # content is what the rollback restores).
        added = stack.cli("targets", "add", "t1", "--namespace", namespace,
                          "--kubeconfig-credential", "c1", "--adopt-unmanaged")  # fmt: skip
        assert "health: healthy" in added
        distribution = json.loads(stack.cli(
            "distributions", "attach", cert["id"], "--target", "t1", "--store-content",
            "-o", "json",
        ))  # fmt: skip
        dry = stack.cli("run", distribution["id"], "--dry-run")
        assert f'Secret "{namespace}/shop-example-com-tls": would update' in dry, dry
        assert _secret(admin, namespace, "shop-example-com-tls").data == original.data

        executed = stack.cli("run", distribution["id"], "--execute")
        assert "succeeded: 1 updated" in executed, executed
        written = _secret(admin, namespace, "shop-example-com-tls")
        assert base64.b64decode(written.data["tls.crt"]) == chain.fullchain_pem

        rolled_back = stack.cli("rollback", distribution["id"])
        assert "succeeded" in rolled_back, rolled_back
    restored = _secret(admin, namespace, "shop-example-com-tls")
    assert restored.data == original.data


def _import_cert(stack: ComposeStack, chain: Any) -> str:
    """`certs import` reads files: write them into the worker's tmpfs, then import them."""
    for name, data in (("cert", chain.leaf_pem), ("chain", chain.chain_pem),
                       ("key", chain.key_pem)):  # fmt: skip
        stack("exec", "-T", "worker", "sh", "-c", f"umask 077; cat > /tmp/{name}.pem",
              input=data.decode())  # fmt: skip
    try:
        return stack.cli("certs", "import", "--cert", "/tmp/cert.pem", "--key", "/tmp/key.pem",
                         "--chain", "/tmp/chain.pem", "-o", "json")  # fmt: skip
    finally:
        stack("exec", "-T", "worker", "rm", "-f", "/tmp/cert.pem", "/tmp/key.pem",
              "/tmp/chain.pem", check=False)  # fmt: skip


def _database(stack: ComposeStack) -> psycopg.Connection[Any]:
    password = (stack.folder / "secrets" / "postgres_password").read_text().strip()
    return psycopg.connect(
        host="127.0.0.1", port=5432, user="certautopilot", password=password,
        dbname="certautopilot", autocommit=True,
    )  # fmt: skip


def _run_state(stack: ComposeStack, run_id: str) -> tuple[str, int]:
    """(run state, targets finished) straight from the database the containers use."""
    with _database(stack) as connection:
        row = connection.execute(
            "SELECT state, (SELECT count(*) FROM target_results r WHERE r.run_id = runs.id "
            "AND r.status NOT IN ('pending', 'running')) FROM runs WHERE id = %s",
            (run_id,),
        ).fetchone()
    assert row is not None, run_id
    return str(row[0]), int(row[1])


def test_a_killed_worker_is_replaced_and_the_reaper_finishes_its_run(
    stack: ComposeStack,
    cluster: Cluster,
    testenv_admin_api: Callable[[Cluster], Any],
) -> None:
    admin = testenv_admin_api(cluster)
    # Thirty batches of one: the run lasts seconds, not the blink twelve took on a quiet host.
    namespaces = [f"kill-{uuid.uuid4().hex[:6]}-{index}" for index in range(30)]
    for namespace in namespaces:
        k8s.CoreV1Api(admin).create_namespace(
            k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace))
        )
    chain = make_chain(cn="kill.example.com", intermediates=0)
    stack.cli("credentials", "add-kubeconfig", "admin", "--stdin", input=cluster.admin_kubeconfig)
    cert = json.loads(_import_cert(stack, chain))
    for index, namespace in enumerate(namespaces):
        stack.cli("targets", "add", f"k{index}", "--namespace", namespace,
                  "--kubeconfig-credential", "admin")  # fmt: skip
    # One target per batch: the run takes long enough to be killed in the middle.
    targets: list[str] = []
    for index in range(len(namespaces)):
        targets += ["--target", f"k{index}"]
    group = uuid.uuid4().hex[:8]
    stack.cli("groups", "create", group, *targets, "--batch-size", "1")
    distribution = json.loads(
        stack.cli("distributions", "attach", cert["id"], "--group", group, "-o", "json")
    )
    (old,) = stack.containers("worker")
    # Looked up before the run starts, so the kill follows the first finished target at once.
    pid = int(stack.engine.docker("inspect", "--format", "{{.State.Pid}}", old["ID"]).stdout)
    queued = json.loads(
        stack.cli("run", distribution["id"], "--execute", "--no-wait", "-o", "json")
    )
    run_id = queued["run_id"]
    deadline = time.monotonic() + 60
    while _run_state(stack, run_id)[1] < 1:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    with PHASES.timed("worker killed -> restarted -> run finished by the reaper"):
        # A crash: the worker's main process dies by SIGKILL (as on an OOM kill). Not
        # `docker kill`, which Docker takes as the user stopping the container on purpose and
        # which no restart policy undoes (shown below).
        os.kill(pid, signal.SIGKILL)
        state, done = _run_state(stack, run_id)
        assert state == "running" and done < len(namespaces), (state, done)
        # The restart policy restarts the worker; the reaper (heartbeat fresh in the new
        # process) resumes the targets the killed one had taken.
        deadline = time.monotonic() + 240
        while _run_state(stack, run_id)[0] == "running":
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(1)
    state, done = _run_state(stack, run_id)
    assert (state, done) == ("succeeded", len(namespaces)), stack.logs()
    (new,) = stack.containers("worker")
    assert new["ID"] == old["ID"] and new["State"] == "running"  # restarted in place
    restarts = stack.engine.docker("inspect", "--format", "{{.RestartCount}}", new["ID"])
    assert int(restarts.stdout) >= 1
    for namespace in namespaces:
        secret = _secret(admin, namespace, "kill-example-com-tls")
        assert base64.b64decode(secret.data["tls.crt"]) == chain.fullchain_pem, namespace

    # `docker kill` is a deliberate stop: the restart policy leaves the container down and
    # `docker compose up` brings the service back.
    stack.engine.docker("kill", new["ID"])
    time.sleep(3)
    (killed,) = stack.containers("worker")
    assert killed["State"] == "exited"
    stack("up", "--detach", "--wait", "--wait-timeout", "120", timeout=180)
    (back,) = stack.containers("worker")
    assert back["State"] == "running" and back["Health"] == "healthy"
