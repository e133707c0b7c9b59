"""``python -m demo``: the main job end to end, narrated for someone who has never seen it.

Every step is a real ``certautopilot`` command (each shown as ``$ certautopilot ...`` before it
runs, in its own process, exactly as an operator types it); the demo only prepares what an
operator would bring (clusters, namespaces, certificate files) and checks the live Secrets as
the cluster admin after each run. On a fresh machine with nothing configured it:

1. makes a throw-away data folder (the embedded default: SQLite database, SQLite message
   broker, a generated encryption key — no Redis, no PostgreSQL) and migrates it;
2. starts two local Kubernetes API servers from the checkout's test environment
   (``tests/testenv``; built once from source, then reused), or uses ``--kubeconfig`` files;
3. starts a real Celery worker process (``certautopilot worker``) with the same settings;
4. generates a CA and a certificate and imports it; in each cluster creates namespaces (as
   the cluster admin: the module itself never creates namespaces) holding an older,
   hand-made Secret, and a ServiceAccount bound to the spec's minimum Role whose kubeconfig
   becomes the credential, so RBAC is real;
5. creates targets in every cluster and a group with a progressive batch size and a
   failure threshold, attaches the certificate with "store content" on, then shows a
   dry-run with its diff, executes, renews the certificate (dry-run diff, execute) and rolls
   back, checking the live Secrets after each step;
6. verifies serving: two small TLS servers serve the certificate of a Secret each — one
   reloads by watching the Secret through the API server (like nginx-ingress), one read it
   once and never reloads (like a controller that caches) — and a run with
   ``--verify-serving`` says which of them serves the new certificate;
7. stops the worker and the clusters and deletes everything it made (also on Ctrl-C).

The commands get an environment with no ``CAP_*`` variable but ``CAP_DATA_DIR`` (the demo's
folder); the demo's own environment is left as it was.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from worker.cli.output import make_console, plain
from worker.core.bundle import describe_certificate

TENANTS = ("shop", "blog")
"""One namespace per tenant in every cluster: ``<tenant>-edge``."""
COMMON_NAME = "www.example.test"
GROUP = "edge"
BATCH_SIZE = "1,50%"
"""A canary target first, then half of the group per batch."""
FAILURE_THRESHOLD = "25%"
RUN_TIMEOUT = 300
WORKER_START_TIMEOUT = 90.0
STORE_CONTENT_OFF_NOTE = (
    "With store content OFF the button is greyed out and `certautopilot rollback` refuses "
    "with the reason `distributions list` shows."
)


class DemoFailed(RuntimeError):
    """A demo step did not produce what it should; the message says which and where to look."""


class DemoInputError(DemoFailed):
    """What the user gave the demo cannot be used (exit code 2)."""


# ----------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class _Issued:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    serial: str


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class _DemoAuthority:
    """A throw-away CA issuing EC P-256 server certificates (cryptography, nothing else)."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CertAutoPilot Demo CA")])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=400))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, valid_from: datetime, valid_until: datetime) -> _Issued:
        """A server certificate for ``common_name`` (also its SAN) with a fresh key."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_until)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        # The serial as the product prints it (worker.core.bundle's formatting), for comparisons.
        return _Issued(pem, _private_key_pem(key), describe_certificate(pem).serial_hex)


# --------------------------------------------------------------------------------- clusters


@dataclass
class _Cluster:
    """A cluster the demo writes to: an admin client for setup and checks, and credentials."""

    name: str
    admin: Any  # kubernetes.client.ApiClient
    credential_for: Callable[[str], str]
    """namespace -> kubeconfig text the worker uses there."""
    namespaces: list[str] = field(default_factory=list)
    """Namespaces the demo created (deleted at the end on user clusters)."""
    admin_kubeconfig: str = field(default="", repr=False)
    """The admin kubeconfig text, for the verify-serving step's TLS servers (they watch)."""


def _core(api: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api)


def _ensure_namespace(api: Any, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        _core(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
        )
    except ApiException as exc:
        if exc.status != 409:
            raise


def _put_secret(api: Any, namespace: str, name: str, issued: _Issued) -> None:
    """Create the hand-made Secret someone deployed before CertAutoPilot (no managed-by label)."""
    from kubernetes import client

    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, labels={"app": "legacy-edge"}),
        type="kubernetes.io/tls",
        data={
            "tls.crt": base64.b64encode(issued.cert_pem).decode("ascii"),
            "tls.key": base64.b64encode(issued.key_pem).decode("ascii"),
        },
    )
    _core(api).create_namespaced_secret(namespace, body)


def _live_serial(api: Any, namespace: str, name: str) -> str:
    """The serial of the certificate the live Secret holds (read as admin)."""
    secret = _core(api).read_namespaced_secret(name, namespace)
    pem = base64.b64decode(secret.data["tls.crt"])
    return describe_certificate(pem).serial_hex


def _certautopilot() -> str:
    """The installed ``certautopilot`` command next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("certautopilot")
    found = str(beside) if beside.is_file() else shutil.which("certautopilot")
    if found is None:
        raise DemoInputError(
            "the certautopilot command is not installed; `bash scripts/demo` installs the "
            "project into .venv and runs the demo there"
        )
    return found


# ------------------------------------------------------------------------------------- demo


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


class _Demo:
    """One demo run; :meth:`close` undoes everything it started, whatever happened."""

    def __init__(self, console: Console, kubeconfigs: Sequence[Path]) -> None:
        self.console = console
        self.kubeconfigs = list(kubeconfigs)
        self.steps = 15
        self.step_no = 0
        self.data_dir = Path(tempfile.mkdtemp(prefix="certautopilot-demo-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
        self.env["CAP_DATA_DIR"] = str(self.data_dir)
        self.cli_path = ""
        self.testenv: Any = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = self.data_dir / "worker.log"
        self.tls_servers: list[Any] = []  # tests.support.tls_server.TlsServer, stopped by PID
        self.clusters: list[_Cluster] = []
        self.places: list[tuple[_Cluster, str, str]] = []  # (cluster, tenant, target name)
        self.secret_name = ""
        self.old_serial = ""
        # On the user's clusters, namespaces get a random prefix so nothing existing is touched.
        self.suffix = uuid.uuid4().hex[:6] if self.kubeconfigs else ""

    # ---------------------------------------------------------------- narration helpers

    def step(self, title: str) -> None:
        self.step_no += 1
        self.console.print()
        self.console.print(Rule(f"Step {self.step_no}/{self.steps} · {title}", align="left"))

    def say(self, *parts: str | Text | tuple[str, str]) -> None:
        """A line of narration; plain strings are shown literally, (text, style) is styled."""
        self.console.print(
            Text.assemble(*(plain(*part) if isinstance(part, tuple) else part for part in parts))
        )

    def cli(self, *args: str) -> None:
        """Run ``certautopilot ARGS`` as an operator would; its output goes to the terminal."""
        self.show_command(args)
        sys.stdout.flush()
        code = subprocess.run(
            [self.cli_path, *args], env=self.env, stdin=subprocess.DEVNULL, check=False
        ).returncode
        if code:
            raise DemoFailed(f"`certautopilot {shlex.join(args)}` exited with {code}")

    def cli_json(self, *args: str) -> Any:
        """Run ``certautopilot ARGS --output json`` and return what it printed, parsed."""
        args = (*args, "--output", "json")
        self.show_command(args)
        result = subprocess.run(
            [self.cli_path, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            raise DemoFailed(
                f"`certautopilot {shlex.join(args)}` exited with {result.returncode}: "
                f"{result.stderr.strip()}"
            )
        return json.loads(result.stdout)

    def show_command(self, args: Sequence[str]) -> None:
        self.say(("  $ certautopilot " + shlex.join(args), "dim"))

    # ------------------------------------------------------------------------ the steps

    def run(self) -> None:
        self.say(
            ("CertAutoPilot demo", "bold"),
            ": deploy a TLS certificate as a kubernetes.io/tls Secret into several namespaces "
            "of several clusters, in batches, with a dry-run first, then renew it and roll "
            "back. Every step is a real `certautopilot` command against real API servers, "
            "RBAC and a real Celery worker.",
        )
        self.prepare_data_dir()
        self.start_clusters()
        self.start_worker()
        cert_id, ca, first_serial = self.import_certificate()
        self.prepare_namespaces(ca)
        self.create_targets()
        distribution_id = self.create_group_and_attach(cert_id)
        self.dry_run(distribution_id, expect=self.old_serial, what="first distribution")
        self.execute(
            distribution_id,
            expect=first_serial,
            title="Execute: write the Secrets, batch by batch",
        )
        renewed_serial = self.renew(cert_id, ca)
        self.dry_run(distribution_id, expect=first_serial, what="renewal")
        self.execute(
            distribution_id,
            expect=renewed_serial,
            title="Execute the renewal: every Secret gets the renewed certificate",
        )
        self.rollback(cert_id, distribution_id)
        self.verify_serving(cert_id)
        self.audit_everything()

    def prepare_data_dir(self) -> None:
        self.step("A throw-away data folder (the embedded default)")
        self.cli_path = _certautopilot()
        self.say(
            f"  CAP_DATA_DIR={self.data_dir}\n"
            "  database: SQLite · message broker: SQLite (kombu) · results: SQLite · "
            "encryption key (KEK): generated into the folder\n"
            "  No Redis or PostgreSQL needed; production points CAP_DATABASE_URL and "
            "CAP_BROKER_URL at them."
        )
        self.cli("migrate")

    def start_clusters(self) -> None:
        self.step("Kubernetes clusters")
        if self.kubeconfigs:
            self.use_own_clusters()
            return
        import tests.testenv as testenv  # the checkout's test environment (not shipped)

        try:
            binaries = testenv.find_binaries(os.environ, build=False)
            self.say(f"  reusing kube-apiserver and etcd from {binaries.folder}")
        except testenv.BinariesError:
            self.say(
                "  building kube-apiserver and etcd from source with Go (one time only, "
                "about 20 minutes on 2 cores; cached for next time) ..."
            )
        self.say("  starting 2 local API servers (each one is an independent cluster) ...")
        started = time.monotonic()
        self.testenv = testenv.TestEnvironment(
            cluster_count=2, environ=os.environ, progress=lambda: sys.stderr
        )
        for cluster in self.testenv.clusters():
            admin = testenv.admin_api_client(cluster)

            def credential_for(namespace: str, cluster: Any = cluster, admin: Any = admin) -> str:
                access = testenv.create_service_account(
                    admin, cluster, namespace, testenv.SPEC_MINIMUM_RULES, "certautopilot"
                )
                return str(access.kubeconfig)

            self.clusters.append(
                _Cluster(
                    cluster.name, admin, credential_for, admin_kubeconfig=cluster.admin_kubeconfig
                )
            )
            self.say(f"  {cluster.name}: {cluster.server}")
        self.say(f"  ready in {time.monotonic() - started:.1f}s")

    def use_own_clusters(self) -> None:
        from kubernetes import config

        for index, path in enumerate(self.kubeconfigs, start=1):
            try:
                text = path.read_text(errors="replace")
            except OSError as exc:
                raise DemoInputError(f"cannot read {path}: {exc.strerror}") from None
            try:
                document = yaml.safe_load(text)
                admin = config.new_client_from_config_dict(document)  # type: ignore[no-untyped-call]
            except (yaml.YAMLError, config.ConfigException, TypeError, AttributeError) as exc:
                # The library's message names the missing field; the file is not echoed.
                raise DemoInputError(
                    f"{path} is not a usable kubeconfig ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
                ) from None
            name = str(document.get("current-context") or path.stem)
            if any(cluster.name == name for cluster in self.clusters):
                name = f"{name}-{index}"  # two files may use the same context name

            def same_kubeconfig(_namespace: str, text: str = text) -> str:
                return text

            self.clusters.append(_Cluster(name, admin, same_kubeconfig, admin_kubeconfig=text))
            self.say(f"  {name}: from {path} (the same kubeconfig is stored as the credential)")

    def start_worker(self) -> None:
        from worker.platform.settings import load_settings

        self.step("A Celery worker process")
        args = ("worker", "--concurrency", "2")
        self.show_command(args)
        heartbeat = load_settings(self.env).tasks.heartbeat_file
        with self.worker_log.open("wb") as log:
            self.worker = subprocess.Popen(
                [self.cli_path, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Its own session: Ctrl-C reaches the demo, which then stops the worker cleanly.
                start_new_session=True,
            )
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not heartbeat.exists():
            if self.worker.poll() is not None:
                raise DemoFailed(f"the worker exited at start:\n{self.worker_log_tail()}")
            if time.monotonic() > deadline:
                raise DemoFailed(f"the worker did not start in time:\n{self.worker_log_tail()}")
            time.sleep(0.2)
        self.say(
            f"  worker pid {self.worker.pid} of pool 'default' is consuming the "
            f"'kubernetes.default' and 'control' queues (log: {self.worker_log})"
        )

    def write_pki(self, stem: str, issued: _Issued) -> tuple[Path, Path]:
        """Certificate and key files, as an operator would have them (the key 0600)."""
        pki = self.data_dir / "pki"
        pki.mkdir(mode=0o700, exist_ok=True)
        cert_file, key_file = pki / f"{stem}.pem", pki / f"{stem}.key"
        cert_file.write_bytes(issued.cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(issued.key_pem)
        return cert_file, key_file

    def import_certificate(self) -> tuple[str, _DemoAuthority, str]:
        self.step("A certificate to distribute")
        ca = _DemoAuthority()
        now = datetime.now(UTC)
        # Issued 60 days ago with 30 days left: due for renewal, which step 10 does.
        issued = ca.issue(
            COMMON_NAME, valid_from=now - timedelta(days=60), valid_until=now + timedelta(days=30)
        )
        cert_file, key_file = self.write_pki("www", issued)
        ca_file = cert_file.with_name("ca.pem")
        ca_file.write_bytes(ca.cert_pem)
        self.say(f"  generated a demo CA and a certificate for {COMMON_NAME} into {ca_file.parent}")
        view = self.cli_json(
            "certs", "import",
            "--cert", str(cert_file), "--key", str(key_file), "--ca", str(ca_file),
        )  # fmt: skip
        self.say(
            f"  imported certificate {view['id']}: CN {view['common_name']}, serial "
            f"{view['serial']}, not after {view['not_after'][:10]} (the private key is stored "
            "encrypted)"
        )
        return str(view["id"]), ca, issued.serial

    def prepare_namespaces(self, ca: _DemoAuthority) -> None:
        from worker.core.names import (
            DEFAULT_SECRET_NAME_TEMPLATE,
            certificate_variables,
            render_secret_name,
        )

        self.step("Namespaces with an older, hand-made Secret; least-privilege credentials")
        now = datetime.now(UTC)
        old = ca.issue(
            COMMON_NAME, valid_from=now - timedelta(days=80), valid_until=now + timedelta(days=10)
        )
        self.old_serial = old.serial
        self.secret_name = render_secret_name(
            DEFAULT_SECRET_NAME_TEMPLATE, certificate_variables(describe_certificate(old.cert_pem))
        )
        self.say(
            "  As the cluster admin, the demo creates each namespace and puts in it the Secret "
            f'"{self.secret_name}" someone deployed by hand: serial {old.serial}, expiring in 10 '
            "days. (CertAutoPilot never creates namespaces.)"
        )
        self.say(
            "  Each target's credential is the kubeconfig you gave, stored encrypted."
            if self.kubeconfigs
            else "  For each namespace it creates a ServiceAccount bound to the spec's minimum "
            "Role (secrets: get, create, update, patch; namespaces: get) and stores that "
            "account's kubeconfig as an encrypted credential."
        )
        folder = self.data_dir / "kubeconfigs"
        folder.mkdir(mode=0o700)
        table = Table("cluster", "namespace", "existing Secret", "credential")
        for cluster in self.clusters:
            for tenant in TENANTS:
                namespace = self.namespace_of(tenant)
                _ensure_namespace(cluster.admin, namespace)
                cluster.namespaces.append(namespace)
                _put_secret(cluster.admin, namespace, self.secret_name, old)
                credential = f"{cluster.name}-{tenant}"
                # Numbered: a context name (the credential's prefix) may hold '/' or ':'.
                kubeconfig = folder / f"credential-{len(self.places) + 1}.yaml"
                kubeconfig.touch(mode=0o600)
                kubeconfig.write_text(cluster.credential_for(namespace))
                self.cli("credentials", "add-kubeconfig", credential, "--file", str(kubeconfig))
                table.add_row(
                    plain(cluster.name),
                    plain(namespace),
                    plain(f"{self.secret_name} (serial {old.serial})"),
                    plain(credential),
                )
                self.places.append((cluster, tenant, credential))
        self.console.print(table)
        self.say("  `certautopilot credentials list` shows names only, never the kubeconfigs.")

    @property
    def namespace_template(self) -> str:
        """The targets' namespace: a template filled from each target's ``tenant`` variable."""
        prefix = f"cap-demo-{self.suffix}-" if self.suffix else ""
        return prefix + "{{ .tenant }}-edge"

    def namespace_of(self, tenant: str) -> str:
        """What :attr:`namespace_template` renders to for ``tenant``."""
        prefix = f"cap-demo-{self.suffix}-" if self.suffix else ""
        return f"{prefix}{tenant}-edge"

    def create_targets(self) -> None:
        self.step("Targets: one per cluster and namespace (saving runs the health check)")
        for _, tenant, name in self.places:
            target = self.cli_json(
                "targets", "add", name, "--namespace", self.namespace_template,
                "--var", f"tenant={tenant}", "--kubeconfig-credential", name, "--adopt-unmanaged",
            )  # fmt: skip
            status, message = target["health_status"], target["health_message"] or ""
            if status != "healthy":
                raise DemoFailed(f"target {name} is not healthy: {message}")
            self.say("    health: ", (status, "green"), " — ", message)
        self.say(
            "  --adopt-unmanaged: the namespaces already hold a Secret CertAutoPilot did not "
            "create; without the flag it refuses to overwrite it."
        )

    def create_group_and_attach(self, cert_id: str) -> str:
        self.step("A group, and the certificate attached to it")
        members = [arg for _, _, name in self.places for arg in ("--target", name)]
        self.cli(
            "groups", "create", GROUP, *members,
            "--batch-size", BATCH_SIZE, "--failure-threshold", FAILURE_THRESHOLD,
        )  # fmt: skip
        self.say(
            f"  A canary batch of one target first, then half the group per batch. The run "
            f"halts if more than {FAILURE_THRESHOLD} of the targets fail, or every target of a "
            "batch fails; the rest are then skipped."
        )
        distribution = self.cli_json(
            "distributions", "attach", cert_id, "--group", GROUP, "--store-content"
        )
        self.say(
            f"  distribution {distribution['id']}; store content ON keeps each Secret as it was "
            "before the first write, which is what Rollback restores."
        )
        return str(distribution["id"])

    # ------------------------------------------------------------------------------ runs

    def check_live(self, expect: str, meaning: str) -> None:
        """Read every Secret as the admin and confirm which certificate it holds."""
        for cluster, tenant, _ in self.places:
            namespace = self.namespace_of(tenant)
            serial = _live_serial(cluster.admin, namespace, self.secret_name)
            if serial != expect:
                raise DemoFailed(
                    f"{cluster.name} {namespace}/{self.secret_name} holds serial {serial}, "
                    f"expected {expect}"
                )
        self.say(
            "  ",
            ("checked", "green"),
            f" in the clusters: all {len(self.places)} Secrets hold serial {expect} ({meaning}).",
        )

    def dry_run(self, distribution_id: str, *, expect: str, what: str) -> None:
        self.step(f"Dry-run of the {what}: the diff, and nothing written")
        self.cli("run", distribution_id, "--dry-run", "--timeout", str(RUN_TIMEOUT))
        self.check_live(expect, "nothing was written")

    def execute(self, distribution_id: str, *, expect: str, title: str) -> None:
        self.step(title)
        self.cli("run", distribution_id, "--execute", "--timeout", str(RUN_TIMEOUT))
        self.check_live(expect, "the new certificate")
        self.say(
            "  Pods that mount the Secret as a volume see it within about a minute; pods "
            "reading it from environment variables need a restart (a webhook distribution "
            "stacked after this one can trigger that)."
        )

    def renew(self, cert_id: str, ca: _DemoAuthority) -> str:
        self.step("Renewal: a new certificate under the same id")
        now = datetime.now(UTC)
        renewed = ca.issue(
            COMMON_NAME, valid_from=now - timedelta(minutes=5), valid_until=now + timedelta(days=90)
        )
        cert_file, key_file = self.write_pki("renewed", renewed)
        self.cli("certs", "renew", cert_id, "--cert", str(cert_file), "--key", str(key_file))
        self.say(
            "  The renewal is valid 60 days longer; the distribution now delivers it "
            "(a dry-run first)."
        )
        return renewed.serial

    def rollback(self, cert_id: str, distribution_id: str) -> None:
        self.step("Rollback: back to the Secrets as they were before CertAutoPilot")
        (view,) = (
            d
            for d in self.cli_json("distributions", "list", "--cert", cert_id)
            if d["id"] == distribution_id
        )
        self.say(f"  rollback button: {'enabled' if view['rollback_available'] else 'greyed out'}")
        self.say(f"  tooltip: {view['rollback_reason']}")
        self.cli("rollback", distribution_id, "--timeout", str(RUN_TIMEOUT))
        self.check_live(self.old_serial, "the hand-made Secret is back")
        self.say(f"  {STORE_CONTENT_OFF_NOTE}")

    def verify_serving(self, cert_id: str) -> None:
        from tests.support.tls_server import TlsServer  # the checkout's test server

        self.step("Verify serving: does the new certificate reach the traffic?")
        cluster, tenant, credential = self.places[0]
        namespace = self.namespace_of(tenant)
        self.say(
            "  Writing the Secret is half the job: an ingress that caches its certificates "
            "keeps serving the old one. Two small TLS servers on 127.0.0.1 each serve the "
            f"certificate of a Secret in {cluster.name} {namespace}:"
        )
        servers = {}
        for name, mode, behaviour in (
            ("serving-reload", "reload", "watches its Secret through the API server and "
             "reloads on every change (like nginx-ingress)"),
            ("serving-cache", "once", "read its Secret once at start and never again (like a "
             "controller that caches); there was none yet, so it serves a fallback"),
        ):  # fmt: skip
            server = TlsServer(
                cluster.admin_kubeconfig,
                namespace,
                f"{name}-tls",
                mode=mode,
                folder=self.data_dir / "tls-servers",
            )
            self.tls_servers.append(server)
            servers[name] = server
            self.say(f"  {server.endpoint} (pid {server.process.pid}) {behaviour}")
        for name, server in servers.items():
            self.cli(
                "targets", "add", name, "--namespace", namespace,
                "--kubeconfig-credential", credential, "--secret-name", f"{name}-tls",
                "--verify-serving", server.endpoint, "--serving-deadline", "5s",
                "--serving-ca", "own-chain",
            )  # fmt: skip
        self.cli(
            "groups", "create", "serving", "--target", "serving-reload", "--target",
            "serving-cache", "--batch-size", "100%", "--failure-threshold", "100%",
        )  # fmt: skip
        distribution = self.cli_json("distributions", "attach", cert_id, "--group", "serving")
        self.say(
            "  After the execute writes each Secret, the worker (not the CLI) probes each "
            "endpoint with a TLS handshake until it presents the new leaf (SHA-256 compared) "
            "or the deadline passes (5 s here; 120 s by default, for kubelet's ~60 s sync):"
        )
        self.cli("run", distribution["id"], "--execute", "--timeout", str(RUN_TIMEOUT))
        (run_id,) = (
            run["id"]
            for run in self.cli_json("runs", "list", "--distribution", distribution["id"])
            if run["action"] == "execute"
        )
        report = self.cli_json("runs", "show", run_id)
        outcome = {r["target_name"]: r["serving_status"] for r in report["results"]}
        if outcome != {"serving-reload": "verified", "serving-cache": "stale"}:
            raise DemoFailed(
                f"verify serving ended {outcome}; expected the reloading endpoint verified "
                "and the caching one stale"
            )
        self.say(
            "  ",
            ("checked", "green"),
            ": the reloading endpoint serves the new certificate; the caching one still serves "
            "its old one. The write itself succeeded either way. Fix: restart (or reload) "
            "the consumer that caches; the Secret is already updated.",
        )
        self.say(
            "  With `groups create ... --require-serving`, a target that does not serve the new "
            "certificate by its deadline is a failed target (not_serving), so a canary batch "
            "that does not serve it halts the rollout."
        )

    def audit_everything(self) -> None:
        self.step("Audit: what is deployed where, today")
        self.say(
            "  A read-only run over every distribution's targets: one GET per target, no write, "
            "no snapshot. Each Secret is classified by the certificate it really holds, most "
            "urgent first:"
        )
        self.cli("audit", "--all", "--timeout", str(RUN_TIMEOUT))
        rows = self.cli_json("audit", "--all", "--timeout", str(RUN_TIMEOUT))["rows"]
        states = {row["target_name"]: row["state"] for row in rows}
        expected = {name: "unmanaged" for _, _, name in self.places}
        expected.update({"serving-reload": "current", "serving-cache": "current"})
        if states != expected:
            raise DemoFailed(f"the audit found {states}; expected {expected}")
        self.say(
            "  ",
            ("checked", "green"),
            ": the rolled-back namespaces hold their hand-made certificate again (unmanaged: "
            "not written by CertAutoPilot), and the verify-serving Secrets hold the current "
            "revision. The scheduler runs the same on a timer: service.enqueue_audit(...).",
        )

    # --------------------------------------------------------------------------- cleanup

    def worker_log_tail(self, lines: int = 30) -> str:
        try:
            text = self.worker_log.read_text(errors="replace")
        except OSError:
            return "(no worker log)"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop the worker and clusters and delete what the demo created."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        self.console.print()
        self.console.print(Rule("Cleaning up", align="left"))
        for server in self.tls_servers:
            server.stop()
            self.say(f"  stopped the TLS server pid {server.process.pid}")
        if self.worker is not None and self.worker.poll() is None:
            # SIGTERM = Celery's warm shutdown: running tasks finish, then it exits.
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()
            self.say("  stopped the worker")
        for cluster in self.clusters if self.kubeconfigs else []:
            for namespace in cluster.namespaces:
                try:
                    _core(cluster.admin).delete_namespace(namespace)
                except (ApiException, HTTPError, OSError) as exc:  # cleanup goes on regardless
                    self.say(f"  could not delete namespace {namespace} in {cluster.name}: {exc}")
                else:
                    self.say(f"  deleted namespace {namespace} in {cluster.name}")
        for cluster in self.clusters:
            cluster.admin.close()
        if self.testenv is not None:
            self.testenv.close()
            self.say("  stopped the local clusters")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.say(f"  removed {self.data_dir}")


def run_demo(kubeconfigs: Sequence[Path] = (), *, console: Console | None = None) -> int:
    """Run the demo; returns the exit code (0 done, 1 a step failed, 2 bad input, 130 Ctrl-C)."""
    console = console or make_console()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    demo = _Demo(console, kubeconfigs)
    code = 0
    try:
        demo.run()
    except KeyboardInterrupt:
        console.print(
            Text.assemble(
                ("\ninterrupted", "bold yellow"), ": stopping everything the demo started"
            )
        )
        code = 130
    except DemoFailed as exc:
        console.print(Text.assemble(("demo failed:", "bold red"), " ", plain(exc)))
        code = 2 if isinstance(exc, DemoInputError) else 1
    finally:
        try:
            demo.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    if code == 0:
        console.print(
            Text.assemble(
                ("\nDemo finished in " + f"{elapsed:.0f}s.", "bold green"),
                " Next: README.md → Quickstart to run it against your own clusters "
                "(`bash scripts/demo --kubeconfig FILE`), and `certautopilot --help`.",
            )
        )
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Show the whole job end to end on throw-away local clusters (or your own).",
    )
    parser.add_argument(
        "--kubeconfig",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="Use your own cluster(s) instead of starting local ones (repeatable; needs rights "
        "to create namespaces; the demo deletes what it created).",
    )
    parser.add_argument(
        "--pools",
        action="store_true",
        help="The multi-cluster scenario instead: two worker pools, each running in its own "
        "local cluster, with in-cluster targets (demo/pools.py).",
    )
    options = parser.parse_args(argv)
    if options.pools:
        if options.kubeconfig:
            parser.error("--pools starts its own local clusters; it takes no --kubeconfig")
        from demo.pools import run_pools_demo

        return run_pools_demo()
    return run_demo(options.kubeconfig)


if __name__ == "__main__":
    sys.exit(main())
