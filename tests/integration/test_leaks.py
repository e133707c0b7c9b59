"""Leak checks: after a suite of runs (dry-run, execute, renewal, rollback, failures, webhook,
health checks, CLI use), no private key, token, client key, HMAC secret or KEK appears in any
place an operator or attacker could read: worker logs at DEBUG, CLI output, every Redis key
and every command Redis received (MONITOR), Flower's API, texts stored in the database, or
files left in temp folders. The columns that hold secrets must hold envelope ciphertext only.

The suite runs once per module (a private database, a private Redis, the worker and Flower
started through the real ``certautopilot`` CLI); each test searches one place.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import urllib3
import yaml
from kubernetes import client as k8s
from sqlalchemy import LargeBinary, select

from models.base import Base
from tasks.distribution import dispatcher
from tests.certfactory import make_chain
from tests.support.faults import seed_previous_secrets
from tests.support.pipeline import Fleet, Pipeline, build_fleet, pipeline
from tests.support.receiver import WebhookReceiver
from tests.testenv import SPEC_MINIMUM_RULES
from tests.testenv.environment import WORKDIR_PREFIX
from worker.app import service

CLI = str(Path(sys.executable).parent / "certautopilot")
FLOWER_AUTH = "ops:leak-check-flower-pw"
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{40,}={0,2}")


# --------------------------------------------------------------------------------- needles


@dataclass
class Needles:
    """Every secret of the suite, as the byte strings that would betray it."""

    named: dict[str, list[bytes]] = field(default_factory=dict)

    def add_pem(self, name: str, pem: bytes) -> None:
        """A PEM secret: the whole text, each base64 body line, and its base64 encoding."""
        lines = [line for line in pem.splitlines()[1:-1] if len(line) >= 20]
        encoded = base64.b64encode(pem)
        self.named[name] = [pem, *lines, encoded[:60]]

    def add_value(self, name: str, value: bytes) -> None:
        """A plain secret (token, HMAC secret, KEK) and its base64 encoding."""
        self.named[name] = [value, base64.b64encode(value)[:60]]

    def find(self, haystack: bytes) -> list[str]:
        """Names of the secrets found in ``haystack`` (searched also inside base64 blobs)."""
        expanded = _expand(haystack)
        return sorted(
            name for name, forms in self.named.items() if any(form in expanded for form in forms)
        )


def _expand(data: bytes, depth: int = 3) -> bytes:
    """``data`` plus the decoding of every base64 run in it (kombu bodies are base64 JSON)."""
    parts = [data]
    layer = data
    for _ in range(depth):
        decoded = []
        for match in _BASE64_RUN.finditer(layer):
            run = match.group(0)
            try:
                decoded.append(base64.b64decode(run + b"=" * (-len(run) % 4)))
            except (binascii.Error, ValueError):
                continue
        if not decoded:
            break
        layer = b"\n".join(decoded)
        parts.append(layer)
    return b"\n".join(parts)


# ---------------------------------------------------------------------------------- suite


@dataclass
class Suite:
    """What the suite left behind, by place."""

    needles: Needles
    pipe: Pipeline
    worker_log: bytes
    json_log: bytes
    """The second worker's log (CAP_LOG_FORMAT=json); also part of ``worker_log``."""
    metrics: bytes
    """A scrape of the second worker's /metrics endpoint after every run."""
    cli_output: dict[str, bytes]
    redis_dump: dict[bytes, bytes]
    redis_monitor: bytes
    flower: dict[str, bytes]
    temp_files: list[Path]
    started: float
    runs: dict[str, service.RunReport]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Monitor(threading.Thread):
    """Records every command Redis executes (MONITOR): every message, even ones consumed."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self._client = redis.Redis.from_url(url)
        self.lines: list[bytes] = []
        self.ready = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        with self._client.monitor() as monitor:
            self.ready.set()
            connection = monitor.connection
            while not self.stopping.is_set():
                try:
                    if connection is not None and connection.can_read(timeout=0.2):
                        self.lines.append(connection.read_response())
                except (redis.RedisError, OSError):
                    return


def _dump_redis(url: str) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(url)
    dump: dict[bytes, bytes] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            value: Any = client.get(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = client.xrange(key)
        else:
            value = kind
        dump[key] = repr(value).encode()
    return dump


def _cli(env: dict[str, str], *args: str, stdin: bytes | None = None) -> tuple[int, bytes]:
    done = subprocess.run(
        [CLI, *args],
        input=stdin,
        env={**os.environ, **env, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True,
        timeout=180,
    )
    return done.returncode, done.stdout + done.stderr


def _seed(fleet: Fleet, admin_api: Any, names: list[str]) -> bytes:
    """Existing managed Secrets with an older certificate (so snapshots hold real content)."""
    placements = [fleet.placement[name] for name in names]
    return seed_previous_secrets(admin_api, placements, fleet.distribution_id).key_pem


def _dead_server() -> str:
    return f"https://127.0.0.1:{_free_port()}"


@pytest.fixture(scope="module")
def suite(
    testenv: Any,
    clusters: list[Any],
    make_redis_server: Any,
    tmp_path_factory: Any,
) -> Iterator[Suite]:
    from tests.testenv.access import admin_api_client, create_service_account

    started = time.time()
    tmp = tmp_path_factory.mktemp("leaks")
    server = testenv.postgres()
    url = server.create_database("leaks")
    broker = make_redis_server(appendonly=False)
    monitor = _Monitor(broker.url)
    monitor.start()
    monitor.ready.wait(10)
    admins = {cluster.name: admin_api_client(cluster) for cluster in clusters}
    needles = Needles()
    cli_output: dict[str, bytes] = {}
    runs: dict[str, service.RunReport] = {}
    processes: list[subprocess.Popen[bytes]] = []
    worker_log_path = tmp / "worker-debug.log"
    json_log_path = tmp / "worker-json.log"
    metrics_port = _free_port()
    try:
        with pipeline(url, broker.url, tmp) as pipe:
            env = dict(pipe.env)
            needles.add_value("KEK", env["CAP_KEK"].split(":", 1)[1].encode())
            # The worker and Flower as an operator starts them: through the CLI, at DEBUG.
            with worker_log_path.open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [CLI, "worker", "--concurrency", "3", "--loglevel", "DEBUG"],
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            # A second worker logging JSON lines and serving metrics: both are searched too.
            with json_log_path.open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [CLI, "worker", "--concurrency=2", "--loglevel=DEBUG", "--hostname=j@%h"],
                        env={
                            **os.environ,
                            **env,
                            "CAP_LOG_FORMAT": "json",
                            "CAP_METRICS_PORT": str(metrics_port),
                            "CAP_METRICS_ADDRESS": "127.0.0.1",
                        },
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            flower_port = _free_port()
            with (tmp / "flower.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [CLI, "flower", "--port", str(flower_port)],
                        env={**os.environ, **env, "FLOWER_BASIC_AUTH": FLOWER_AUTH},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait_for(lambda: b" ready." in worker_log_path.read_bytes(), 60, "worker ready")
            _wait_for(lambda: b" ready." in json_log_path.read_bytes(), 60, "JSON worker ready")

            namespace = f"leak-{uuid.uuid4().hex[:6]}"
            sa = {
                c.name: create_service_account(
                    admins[c.name], c, namespace, SPEC_MINIMUM_RULES, None
                )
                for c in clusters[:2]
            }
            for name, access in sa.items():
                needles.add_value(f"token {name}", access.token.encode())
            admin_doc = yaml.safe_load(clusters[2].admin_kubeconfig)
            admin_key = base64.b64decode(admin_doc["users"][0]["user"]["client-key-data"])
            needles.add_pem("admin client key", admin_key)
            kubeconfigs = {
                clusters[0].name: sa[clusters[0].name].kubeconfig,
                clusters[1].name: sa[clusters[1].name].kubeconfig.replace(
                    clusters[1].server, _dead_server()
                ),
                clusters[2].name: clusters[2].admin_kubeconfig,
            }
            k8s.CoreV1Api(admins[clusters[2].name]).create_namespace(
                {"metadata": {"name": namespace}}
            )
            fleet = build_fleet(
                pipe,
                clusters[:3],
                None,
                targets=9,
                namespace=namespace,
                failure_threshold="100%",
                kubeconfigs=kubeconfigs,
            )
            needles.add_pem("certificate key", fleet.chain.key_pem)
            live_targets = [
                n for n in fleet.target_names if fleet.placement[n][0] is not clusters[1]
            ]
            needles.add_pem(
                "previous key", _seed(fleet, lambda c: admins[c.name], live_targets[:3])
            )

            # A target whose Role lacks update: a forbidden failure with a message stored.
            denied_ns = f"leak-denied-{uuid.uuid4().hex[:4]}"
            denied = create_service_account(
                admins[clusters[0].name],
                clusters[0],
                denied_ns,
                [
                    {**SPEC_MINIMUM_RULES[0], "verbs": ["get", "create", "patch"]},
                    SPEC_MINIMUM_RULES[1],
                ],
                None,
            )
            needles.add_value("token denied", denied.token.encode())
            service.add_kubeconfig_credential(pipe.runtime, "denied", denied.kubeconfig.encode())
            service.create_target(
                pipe.runtime,
                service.TargetSpec(
                    name="denied",
                    namespace=denied_ns,
                    credential="denied",
                    secret_name="denied-tls",
                ),
                check=False,
            )
            fleet.placement["denied"] = (clusters[0], denied_ns, "denied-tls")
            _seed(fleet, lambda c: admins[c.name], ["denied"])
            service.add_group_targets(pipe.runtime, f"{namespace}-group", ["denied"])

            # Output formats (issue 14 §4): a target writing tls-combined.pem (the key again)
            # and keystore.p12, whose password is stored through the CLI.
            pkcs12_password = os.urandom(18).hex().encode()
            needles.add_value("PKCS#12 password", pkcs12_password)
            cli_output["add-pkcs12-password"] = _cli(
                env, "credentials", "add-pkcs12-password", "java-ks", "--stdin",
                stdin=pkcs12_password + b"\n",
            )[1]  # fmt: skip
            java_ns = f"leak-java-{uuid.uuid4().hex[:4]}"
            java = create_service_account(
                admins[clusters[0].name], clusters[0], java_ns, SPEC_MINIMUM_RULES, None
            )
            needles.add_value("token java", java.token.encode())
            service.add_kubeconfig_credential(pipe.runtime, "java", java.kubeconfig.encode())
            service.create_target(
                pipe.runtime,
                service.TargetSpec(
                    name="java",
                    namespace=java_ns,
                    credential="java",
                    secret_name="java-tls",
                    combined_pem=True,
                    pkcs12_password_credential="java-ks",
                ),
                check=False,
            )
            fleet.placement["java"] = (clusters[0], java_ns, "java-tls")
            service.add_group_targets(pipe.runtime, f"{namespace}-group", ["java"])

            hmac_secret = os.urandom(24).hex().encode()
            needles.add_value("webhook HMAC secret", hmac_secret)
            receiver = WebhookReceiver()
            hook_url = receiver.url
            service.add_webhook_secret(pipe.runtime, "hook-hmac", hmac_secret)
            hook = service.attach_webhook(
                pipe.runtime, fleet.certificate_id, hook_url, secret="hook-hmac"
            )

            for target in service.list_targets(pipe.runtime):
                service.check_target_health(pipe.runtime, target.id)

            # The operator's view: CLI commands, including a refused secret-bearing input.
            distribution = fleet.distribution_id
            cli_output["run --dry-run"] = _cli(env, "run", distribution, "--dry-run")[1]
            runs["execute"] = pipe.wait(pipe.enqueue(distribution, "execute"))
            # The execute run fails partially (by design), so the stacked webhook is run alone.
            runs["webhook"] = pipe.wait(pipe.enqueue(hook, "execute"))
            assert receiver.requests, "the webhook never arrived"
            receiver.close()
            renewed = make_chain(cn="shop.example.com", fresh_leaf_key=True)
            needles.add_pem("renewed key", renewed.key_pem)
            files = tmp / "operator-files"
            files.mkdir()
            (files / "cert.pem").write_bytes(renewed.leaf_pem)
            (files / "key.pem").write_bytes(renewed.key_pem)
            (files / "chain.pem").write_bytes(renewed.chain_pem)
            cli_output["certs renew"] = _cli(
                env,
                "certs",
                "renew",
                fleet.certificate_id,
                "--cert",
                str(files / "cert.pem"),
                "--key",
                str(files / "key.pem"),
                "--chain",
                str(files / "chain.pem"),
            )[1]
            for path in files.iterdir():
                path.unlink()  # the operator's own files, not the product's
            files.rmdir()
            runs["renewal"] = pipe.wait(pipe.enqueue(distribution, "execute", cascade=False))
            cli_output["rollback"] = _cli(env, "rollback", distribution)[1]
            dangerous = yaml.safe_load(sa[clusters[0].name].kubeconfig)
            dangerous["users"][0]["user"]["exec"] = {"command": "/bin/sh", "apiVersion": "v1"}
            cli_output["refused kubeconfig"] = _cli(
                env,
                "credentials",
                "add-kubeconfig",
                "bad",
                "--stdin",
                stdin=yaml.safe_dump(dangerous).encode(),
            )[1]
            for report in service.list_runs(pipe.runtime, with_results=True):
                runs.setdefault(report.id, report)
                cli_output[f"runs show {report.id}"] = _cli(
                    env, "runs", "show", report.id, "--diff"
                )[1]
                cli_output[f"runs show {report.id} json"] = _cli(
                    env, "runs", "show", report.id, "--output", "json"
                )[1]
            for command in (
                ("runs", "list"),
                ("targets", "list"),
                ("credentials", "list"),
                ("certs", "list"),
                ("distributions", "list"),
                ("groups", "list"),
                ("targets", "show", "denied"),
                ("targets", "show", "java"),
            ):
                cli_output[" ".join(command)] = _cli(env, *command)[1]
            # Late duplicates land in Redis too.
            dispatcher.process_targets(runs["execute"].id, fleet.target_names[:2])

            flower = _flower_pages(flower_port)
            scrape = urllib3.request("GET", f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
            assert scrape.status == 200, scrape.data[:500]
            redis_dump = _dump_redis(broker.url)
            monitor.stopping.set()
            monitor.join(timeout=5)
            for process in processes:  # warm shutdown: every log line written
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
            yield Suite(
                needles=needles,
                pipe=pipe,
                worker_log=worker_log_path.read_bytes()
                + json_log_path.read_bytes()
                + (tmp / "flower.log").read_bytes(),
                json_log=json_log_path.read_bytes(),
                metrics=scrape.data,
                cli_output=cli_output,
                redis_dump=redis_dump,
                redis_monitor=b"\n".join(repr(line).encode() for line in monitor.lines),
                flower=flower,
                temp_files=_temp_files(started, [Path(pipe.settings.data_dir)]),
                started=started,
                runs=runs,
            )
    finally:
        monitor.stopping.set()
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        for api in admins.values():
            api.close()  # type: ignore[no-untyped-call]
        server.drop_database(url)


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _flower_pages(port: int) -> dict[str, bytes]:
    """Flower's API as an operator reads it: task list, workers, and every task's details."""
    http = urllib3.PoolManager()
    auth = urllib3.make_headers(basic_auth=FLOWER_AUTH)
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> bytes:
        return http.request("GET", base + path, headers=auth, timeout=10).data

    _wait_for(lambda: b"cap.kube.target" in get("/api/tasks"), 60, "Flower to list tasks")
    pages = {"/api/tasks": get("/api/tasks"), "/api/workers": get("/api/workers?refresh=1")}
    for task_id in list(json.loads(pages["/api/tasks"]))[:60]:
        pages[f"/api/task/info/{task_id}"] = get(f"/api/task/info/{task_id}")
    return pages


def _temp_files(since: float, extra: list[Path]) -> list[Path]:
    """Files written since ``since`` in temp folders (and ``extra``), except test fixtures:
    pytest's own folders and the test environment's servers (etcd stores the Secrets)."""
    roots = [Path(tempfile.gettempdir()), Path("/dev/shm"), *extra]
    found: list[Path] = []
    for root in roots:
        if not root.exists():
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = [
                d
                for d in dirs
                if not d.startswith((WORKDIR_PREFIX, "pytest-of-"))
                and not (Path(folder) / d).is_symlink()
            ]
            for name in files:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except OSError:
                    continue
                if stat.st_mtime >= since and stat.st_size < 8 * 1024 * 1024 and path.is_file():
                    found.append(path)
    return found


# ---------------------------------------------------------------------------------- tests


def _assert_clean(suite: Suite, place: str, haystack: bytes) -> None:
    hits = suite.needles.find(haystack)
    assert hits == [], f"{place} holds: {', '.join(hits)}"


def test_the_suite_exercised_every_path_it_claims(suite: Suite) -> None:
    states = {report.state for report in suite.runs.values()}
    results = {r.status for report in suite.runs.values() for r in report.results}
    reasons = {r.error_reason for report in suite.runs.values() for r in report.results}
    assert {"succeeded", "failed"} <= states, states
    assert {"would_create", "created", "updated", "rolled_back", "failed"} <= results, results
    assert {"unreachable", "forbidden"} <= reasons, reasons
    assert any(key.startswith("webhook") for key in suite.runs)
    assert b"DEBUG" in suite.worker_log and b"cap.kube.target" in suite.worker_log
    assert suite.redis_monitor.count(b"LPUSH") >= 10, "MONITOR saw no messages"
    assert b"cap.kube.target" in suite.flower["/api/tasks"]
    assert len(suite.needles.named) >= 8
    # The formats target was written (its keystore built and its password used).
    java = [r for report in suite.runs.values() for r in report.results if r.target_name == "java"]
    assert {"created", "updated"} <= {r.status for r in java}, java
    # The search sees through the encodings secrets would travel in (base64 JSON bodies).
    key = suite.pipe.env["CAP_KEK"].encode()
    wrapped = base64.b64encode(json.dumps({"body": key.decode()}).encode())
    assert suite.needles.find(b'{"body": "' + wrapped + b'"}') == ["KEK"]


def test_the_json_worker_logged_json_lines_with_their_context(suite: Suite) -> None:
    lines = [json.loads(line) for line in suite.json_log.splitlines() if line.startswith(b"{")]
    # Everything that went through logging is JSON: no line in Celery's text layout.
    assert not re.search(
        rb"(?m)^\[\d{4}-\d\d-\d\d [^]]*: (DEBUG|INFO|WARNING|ERROR)", suite.json_log
    )
    assert len(lines) >= 20
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    targets = [line for line in lines if "target_id" in line]
    assert targets, "the JSON worker processed no target"
    assert all({"run_id", "task_id", "batch"} <= set(line) for line in targets)
    run_ids = {report.id for report in suite.runs.values()}
    assert {line["run_id"] for line in targets} <= run_ids


@pytest.mark.parametrize(
    "source", ["worker and flower logs (DEBUG, text and JSON)", "CLI output", "metrics"]
)
def test_no_secret_in_logs_or_cli_output(suite: Suite, source: str) -> None:
    if source == "metrics":
        assert b"certautopilot_targets_processed_total" in suite.metrics
        _assert_clean(suite, source, suite.metrics)
    elif source == "CLI output":
        for command, output in suite.cli_output.items():
            _assert_clean(suite, f"`certautopilot {command}`", output)
    else:
        _assert_clean(suite, source, suite.worker_log)


def test_no_secret_in_any_redis_key_or_in_any_command_redis_received(suite: Suite) -> None:
    assert suite.redis_dump, "Redis was empty: nothing was checked"
    for key, value in suite.redis_dump.items():
        _assert_clean(suite, f"Redis key {key!r}", key + b" " + value)
    _assert_clean(suite, "Redis MONITOR stream", suite.redis_monitor)


def test_no_secret_in_flower_api(suite: Suite) -> None:
    for page, body in suite.flower.items():
        _assert_clean(suite, f"Flower {page}", body)


def test_no_secret_in_texts_stored_in_the_database(suite: Suite) -> None:
    with suite.pipe.runtime.session() as session:
        for table in Base.metadata.sorted_tables:
            readable = [c for c in table.columns if not isinstance(c.type, LargeBinary)]
            for row in session.execute(select(*readable)).all():
                _assert_clean(suite, f"table {table.name}", repr(tuple(row)).encode())


def test_columns_holding_secrets_contain_only_envelope_ciphertext(suite: Suite) -> None:
    sealed = 0
    with suite.pipe.runtime.session() as session:
        for table in Base.metadata.sorted_tables:
            for column in (c for c in table.columns if isinstance(c.type, LargeBinary)):
                for (value,) in session.execute(select(column)).all():
                    if value is None:
                        continue
                    sealed += 1
                    blob = bytes(value)
                    assert b"PRIVATE KEY" not in blob and b"-----BEGIN" not in blob, column
                    assert b"apiVersion" not in blob and b"token" not in blob, column
                    _assert_clean(suite, f"{table.name}.{column.name}", blob)
    assert sealed >= 5, "no sealed column was checked"


def test_no_secret_in_files_left_in_temp_folders(suite: Suite) -> None:
    for path in suite.temp_files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        _assert_clean(suite, f"file {path}", data)
