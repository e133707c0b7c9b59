"""The operator CLI end to end: the README's main-job command (the demo, `python -m demo` from
the checkout, which `bash scripts/demo` runs) on a fresh machine, and the CLI flow against real
API servers with a real worker process.

Everything runs as subprocesses of the installed console script (the demo drives it too), with
an environment holding no CAP_* variable but the data folder: exactly what an operator's shell
does.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from typer.testing import CliRunner

from models import migrate
from models.rollback import STORE_CONTENT_OFF
from tests.certfactory import make_chain
from tests.testenv import Cluster, ServiceAccountAccess
from worker.cli.main import app

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("certautopilot"))
REPOSITORY = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any CAP_* setting (a fresh machine), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
    env.update(extra)
    return env


def certautopilot(
    env: Mapping[str, str], *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the console script; output is captured as text."""
    return subprocess.run(
        [CLI, *args],
        env=dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def demo(
    env: Mapping[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the demo as `bash scripts/demo` does, from the repository root; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "demo", *args],
        cwd=REPOSITORY,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ----------------------------------------------------------------------------------- demo


def test_demo_runs_the_main_job_end_to_end_on_a_fresh_machine(tmp_path: Path) -> None:
    started = time.monotonic()
    # TMPDIR in tmp_path: the demo's throw-away folders are checked for removal below.
    result = demo(clean_env(TMPDIR=str(tmp_path)), timeout=600)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    expected_in_order: list[str | tuple[str, ...]] = [
        "Step 1/15 · A throw-away data folder (the embedded default)",
        ("reusing kube-apiserver and etcd from", "building kube-apiserver and etcd from source"),
        "cluster-1: https://127.0.0.1:",
        "cluster-2: https://127.0.0.1:",
        "worker pid",
        "$ certautopilot certs import",
        "imported certificate",
        "health: healthy",
        "batch 1: cluster-1-shop",
        "$ certautopilot distributions attach",
        "Dry-run: batch 3/3: 4/4 target(s) done",
        "would update (live resourceVersion",
        "succeeded: 4 would update",
        "(nothing was written)",
        "Execute: batch 3/3: 4/4 target(s) done",
        "succeeded: 4 updated",
        "(the new certificate)",
        "Step 10/15 · Renewal",
        "succeeded: 4 would update",
        "succeeded: 4 updated",
        "rollback button: enabled",
        "succeeded: 4 rolled back",
        "(the hand-made Secret is back)",
        "Step 14/15 · Verify serving",
        "$ certautopilot targets add serving-reload",
        "--verify-serving 127.0.0.1:",
        # The results table is by target name: serving-cache, then serving-reload.
        "still serving serial",
        "verified after",
        "the reloading endpoint serves the new certificate; the caching one still serves",
        "Step 15/15 · Audit",
        "$ certautopilot audit --all",
        "unmanaged",
        "current",
        "the rolled-back namespaces hold their hand-made certificate again",
        "stopped the TLS server pid",
        "stopped the worker",
        "stopped the local clusters",
        "Demo finished in",
    ]
    position = 0
    for expected in expected_in_order:
        choices = (expected,) if isinstance(expected, str) else expected
        hits = [(output.find(c, position), c) for c in choices if output.find(c, position) >= 0]
        assert hits, f"missing (in order) {expected!r}:\n{output[-6000:]}"
        found, line = min(hits)
        position = found + len(line)
    # The dry-run diff shows the serial change; no key material is ever printed.
    assert re.search(r"serial\s+[0-9a-f]+ -> [0-9a-f]+", output)
    assert "PRIVATE KEY" not in output
    assert "token:" not in output
    assert not list(tmp_path.glob("certautopilot-demo-*")), "the demo left its data folder"
    print(f"demo took {elapsed:.1f}s")


def test_demo_refuses_an_unusable_kubeconfig_and_leaves_nothing_behind(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [\n")
    result = demo(clean_env(TMPDIR=str(tmp_path)), "--kubeconfig", str(bad))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{bad} is not a usable kubeconfig" in result.stdout
    assert not list(tmp_path.glob("certautopilot-demo-*"))


# ------------------------------------------------------------------------ CLI + real worker


class Worker:
    """`certautopilot worker` as a subprocess in its own process group."""

    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                [CLI, "worker", "--concurrency", "2"],
                env=dict(env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, heartbeat: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not heartbeat.exists():
            assert self.process.poll() is None, self.log.read_text()[-4000:]
            assert time.monotonic() < deadline, self.log.read_text()[-4000:]
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """`certautopilot ...` on a fresh embedded default, with a worker process running on it.

    The commands run in this process (typer's CliRunner, settings from the invocation's
    environment): a fresh interpreter per command costs seconds of imports, and the console
    script itself is exercised by the demo, worker and Flower tests.
    """
    data = tmp_path / "data"
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CAP_")}
    env.update(
        CAP_DATA_DIR=str(data),
        CAP_REAPER_INTERVAL="2",
        CAP_KUBE_RETRY_ATTEMPTS="2",
        CAP_KUBE_RETRY_MAX_SECONDS="3",
    )
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = runner.invoke(app, list(args), env=env, input=stdin)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(
            ["certautopilot", *args], result.exit_code, result.stdout, result.stderr
        )

    assert f"-> {migrate.head()}" in run("migrate").stdout
    worker_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    worker = Worker(worker_env, tmp_path / "worker.log")
    try:
        worker.wait_ready(data / "worker-heartbeat")
        yield run
    finally:
        worker.stop()


def test_worker_exits_promptly_when_only_its_main_process_gets_sigterm(tmp_path: Path) -> None:
    # Kubernetes signals PID 1 only; the pool children learn about it from the main process.
    env = clean_env(CAP_DATA_DIR=str(tmp_path / "data"))
    for attempt in range(2):
        worker = Worker(env, tmp_path / f"worker-{attempt}.log")
        try:
            worker.wait_ready(tmp_path / "data" / "worker-heartbeat")
            time.sleep(1)  # let the pool children settle into waiting for jobs
            worker.process.send_signal(signal.SIGTERM)
            worker.process.wait(timeout=20)
            assert worker.process.returncode == 0, worker.log.read_text()[-3000:]
        finally:
            worker.stop()
        (tmp_path / "data" / "worker-heartbeat").unlink()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_flower_starts_on_the_same_broker_behind_basic_auth(tmp_path: Path) -> None:
    port = _free_port()
    env = clean_env(CAP_DATA_DIR=str(tmp_path / "data"), FLOWER_BASIC_AUTH="ops:long-password")
    log = tmp_path / "flower.log"
    with log.open("wb") as handle:
        flower = subprocess.Popen(
            [CLI, "flower", "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api/workers"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                break
            except OSError:
                assert flower.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        request = urllib.request.Request(url)
        token = base64.b64encode(b"ops:long-password").decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (http://127.0.0.1)
            assert response.status == 200
        text = log.read_text()
        assert f"sqla+sqlite:///{tmp_path / 'data'}/broker.db" in text
        assert "long-password" not in text
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(timeout=20)


def _live_secret(api: Any, namespace: str, name: str) -> Any:
    try:
        return k8s.CoreV1Api(api).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _write_pems(folder: Path, cn: str) -> tuple[Any, dict[str, str]]:
    chain = make_chain(cn=cn, intermediates=1)
    files = {}
    for name, data in (
        ("cert", chain.leaf_pem),
        ("chain", chain.chain_pem),
        ("key", chain.key_pem),
    ):
        files[name] = str(folder / f"{cn}-{name}.pem")
        Path(files[name]).write_bytes(data)
    return chain, files


def test_cli_dry_run_writes_nothing_execute_creates_the_secret_and_a_failure_exits_1(
    operator: Callable[..., subprocess.CompletedProcess[str]],
    cluster: Cluster,
    make_service_account: Callable[..., ServiceAccountAccess],
    testenv_admin_api: Callable[[Cluster], Any],
    tmp_path: Path,
) -> None:
    # One flow, one worker process, one cluster; the cases build on each other.
    namespace = f"cli-{uuid.uuid4().hex[:8]}"
    access = make_service_account(cluster, namespace)
    admin = testenv_admin_api(cluster)
    chain, pems = _write_pems(tmp_path, "shop.example.com")

    def ok(*args: str, stdin: str | None = None) -> str:
        result = operator(*args, stdin=stdin)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    added_credential = ok("credentials", "add-kubeconfig", "c1", "--stdin", stdin=access.kubeconfig)
    assert access.token not in added_credential
    cert = json.loads(
        ok("certs", "import", "--cert", pems["cert"], "--key", pems["key"],
           "--chain", pems["chain"], "--output", "json")
    )  # fmt: skip
    added = ok("targets", "add", "t1", "--namespace", namespace, "--kubeconfig-credential", "c1")
    assert "health: healthy" in added
    distribution = json.loads(
        ok("distributions", "attach", cert["id"], "--target", "t1", "--output", "json")
    )

    dry = ok("run", distribution["id"], "--dry-run")
    assert f'Secret "{namespace}/shop-example-com-tls": would create' in dry
    assert "succeeded: 1 would create" in dry
    assert _live_secret(admin, namespace, "shop-example-com-tls") is None

    executed = ok("run", distribution["id"], "--execute")
    assert "succeeded: 1 created" in executed
    assert f"{namespace}/shop-example-com-tls" in executed
    secret = _live_secret(admin, namespace, "shop-example-com-tls")
    assert secret.type == "kubernetes.io/tls"
    assert base64.b64decode(secret.data["tls.crt"]) == chain.fullchain_pem

    queued = json.loads(ok("run", distribution["id"], "--dry-run", "--no-wait", "-o", "json"))
    runs = json.loads(ok("runs", "list", "--output", "json"))
    assert (runs[0]["id"], runs[0]["action"]) == (queued["run_id"], "dry_run")
    assert [(r["action"], r["state"]) for r in runs[1:]] == [
        ("execute", "succeeded"),
        ("dry_run", "succeeded"),
    ]
    shown = ok("runs", "show", runs[2]["id"], "--diff")
    assert "would create (it does not exist yet)" in shown
    refused = operator("rollback", distribution["id"])
    assert refused.returncode == 2
    assert STORE_CONTENT_OFF in refused.stderr

    # A target whose namespace does not exist: saved (unhealthy, `targets add` exits 1), and its
    # run exits 1.
    _, other = _write_pems(tmp_path, "gone.example.com")
    ok("credentials", "add-kubeconfig", "admin", "--stdin", stdin=cluster.admin_kubeconfig)
    other_cert = json.loads(
        ok("certs", "import", "--cert", other["cert"], "--key", other["key"], "-o", "json")
    )
    saved = operator(
        "targets", "add", "missing", "--namespace", "no-such-namespace",
        "--kubeconfig-credential", "admin",
    )  # fmt: skip
    assert saved.returncode == 1, (saved.stdout, saved.stderr)
    assert "health: unhealthy" in saved.stdout
    failing = json.loads(
        ok("distributions", "attach", other_cert["id"], "--target", "missing", "-o", "json")
    )
    failed = operator("run", failing["id"], "--execute", "--output", "json")
    assert failed.returncode == 1, failed.stderr
    report = json.loads(failed.stdout)["run"]
    # Its only batch failed past the threshold of 0: the run halts (issue 17 §8).
    assert report["state"] == "halted"
    assert "failure threshold exceeded (1 of 1 failed, threshold 0)" in report["reason"]
    (result,) = report["results"]
    assert result["error_reason"] == "namespace_not_found"
    assert 'namespaces "no-such-namespace" not found' in result["error_message"]
    # The API server's own text in the results table: the reason in brackets is not taken for
    # Rich markup (it used to vanish from the table) and nothing in it can drive the terminal.
    shown = operator("runs", "show", report["id"])
    assert shown.returncode == 0, shown.stderr
    assert '[namespace_not_found] namespaces "no-such-namespace" not found' in shown.stdout
    assert "\x1b" not in shown.stdout
