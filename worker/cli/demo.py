"""``certautopilot demo``: the main job end to end, narrated for someone who has never seen it.

On a fresh machine with nothing configured it:

1. makes a throw-away data folder (the embedded default: SQLite database, SQLite message
   broker, a generated encryption key — no Redis, no PostgreSQL);
2. starts two local Kubernetes API servers from the source checkout's test environment
   (``tests/testenv``; built once from source, then reused), or uses ``--kubeconfig`` files;
3. starts a real Celery worker process (``certautopilot worker``) with the same settings;
4. generates a CA and a certificate and imports it; in each cluster creates namespaces (as
   the cluster admin: the module itself never creates namespaces) holding an older,
   hand-made Secret, and a ServiceAccount bound to the spec's minimum Role whose kubeconfig
   becomes the credential, so RBAC is real;
5. creates targets in every cluster and a group with a progressive batch size and a
   failure threshold, attaches the certificate with "store content" on, then shows a
   dry-run with its diff, executes with a progress bar, renews the certificate (dry-run
   diff, execute) and rolls back, checking the live Secrets after each step;
6. stops the worker and the clusters and deletes everything it made (also on Ctrl-C).

The demo process is a composition root like the CLI: it points ``CAP_DATA_DIR`` at its
folder (and hides any other ``CAP_*`` variable) for itself and the worker, and restores
the environment when it ends.
"""

from __future__ import annotations

import base64
import os
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
from types import FrameType, ModuleType
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from worker.cli.output import follow_run, make_console, print_report
from worker.core.bundle import describe_certificate

__all__ = ["DemoFailed", "DemoInputError", "run_demo"]

TENANTS = ("shop", "blog")
"""One namespace per tenant in every cluster: ``<tenant>-edge``."""
COMMON_NAME = "www.example.test"
GROUP = "edge"
BATCH_SIZE: list[int | str] = [1, "50%"]
"""A canary target first, then half of the group per batch."""
FAILURE_THRESHOLD = "25%"
RUN_TIMEOUT = 300.0
WORKER_START_TIMEOUT = 90.0


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


def _repo_testenv() -> ModuleType:
    """``tests.testenv`` from the source checkout this package runs from."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests" / "testenv" / "__init__.py").is_file():
        raise DemoFailed(
            "local clusters come from the source checkout's test environment (tests/testenv), "
            f"which is not next to {Path(__file__).parent}; run the demo from a git clone, or "
            "pass --kubeconfig FILE to use your own cluster"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import tests.testenv as testenv

    return testenv


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


# ------------------------------------------------------------------------------------- demo


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


class _Demo:
    """One demo run; :meth:`close` undoes everything it started, whatever happened."""

    def __init__(self, console: Console, kubeconfigs: Sequence[Path]) -> None:
        self.console = console
        self.kubeconfigs = list(kubeconfigs)
        self.steps = 13
        self.step_no = 0
        self.saved_environ = {k: v for k, v in os.environ.items() if k.startswith("CAP_")}
        self.data_dir = Path(tempfile.mkdtemp(prefix="certautopilot-demo-"))
        self.testenv: Any = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = self.data_dir / "worker.log"
        self.rt: Any = None
        self.dispatch: Any = None
        self.clusters: list[_Cluster] = []
        self.places: list[tuple[_Cluster, str, str]] = []  # (cluster, tenant, target name)
        self.secret_name = ""
        self.old_serial = ""
        self.new_serial = ""
        # On the user's clusters, namespaces get a random prefix so nothing existing is touched.
        self.suffix = uuid.uuid4().hex[:6] if self.kubeconfigs else ""

    # ---------------------------------------------------------------- narration helpers

    def step(self, title: str) -> None:
        self.step_no += 1
        self.console.print()
        self.console.print(Rule(f"Step {self.step_no}/{self.steps} · {title}", align="left"))

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def command(self, text: str) -> None:
        """Show the CLI command that does the same as what the demo does next."""
        self.console.print(f"  [dim]$ certautopilot {text}[/]", highlight=False)

    # ------------------------------------------------------------------------ the steps

    def run(self) -> None:
        self.say(
            "[bold]CertAutoPilot demo[/]: deploy a TLS certificate as a kubernetes.io/tls Secret "
            "into several namespaces of several clusters, in batches, with a dry-run first, then "
            "renew it and roll back. Every step is real: real API servers, RBAC, a real Celery "
            "worker."
        )
        self.prepare_data_dir()
        self.start_clusters()
        self.start_worker()
        cert_id, ca = self.import_certificate()
        self.prepare_namespaces(ca)
        self.create_targets()
        distribution_id = self.create_group_and_attach(cert_id)
        self.dry_run(distribution_id, expect=self.old_serial, what="first distribution")
        self.execute(distribution_id, expect=self.new_serial)
        self.renew(cert_id, ca, distribution_id)
        self.rollback(distribution_id)

    def prepare_data_dir(self) -> None:
        from worker.cli.main import celery_dispatcher, ensure_schema
        from worker.platform.runtime import build_runtime, set_runtime
        from worker.platform.settings import load_settings

        self.step("A throw-away data folder (the embedded default)")
        for name in self.saved_environ:
            del os.environ[name]
        os.environ["CAP_DATA_DIR"] = str(self.data_dir)
        settings = load_settings(os.environ)
        ensure_schema(settings)
        self.rt = build_runtime(settings)
        set_runtime(self.rt)
        self.dispatch = celery_dispatcher(settings)
        self.say(
            f"  CAP_DATA_DIR={self.data_dir}\n"
            "  database: SQLite · message broker: SQLite (kombu) · results: SQLite · "
            "encryption key (KEK): generated into the folder\n"
            "  No Redis or PostgreSQL needed; production points CAP_DATABASE_URL and "
            "CAP_BROKER_URL at them."
        )

    def start_clusters(self) -> None:
        self.step("Kubernetes clusters")
        if self.kubeconfigs:
            self.use_own_clusters()
            return
        testenv = _repo_testenv()
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

            self.clusters.append(_Cluster(cluster.name, admin, credential_for))
            self.say(f"  {cluster.name}: {cluster.server}")
        self.say(f"  ready in {time.monotonic() - started:.1f}s")

    def use_own_clusters(self) -> None:
        from kubernetes import config

        from worker.cli.files import read_file

        for index, path in enumerate(self.kubeconfigs, start=1):
            text = read_file(path).decode("utf-8", errors="replace")
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

            self.clusters.append(_Cluster(name, admin, same_kubeconfig))
            self.say(f"  {name}: from {path} (the same kubeconfig is stored as the credential)")

    def start_worker(self) -> None:
        self.step("A Celery worker process")
        self.command("worker --concurrency 2")
        heartbeat = self.rt.settings.tasks.heartbeat_file
        with self.worker_log.open("wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "worker.cli.main", "worker", "--concurrency", "2"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
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
            f"  worker pid {self.worker.pid} is consuming the 'kubernetes' and 'control' queues "
            f"(log: {self.worker_log})"
        )

    def import_certificate(self) -> tuple[str, _DemoAuthority]:
        from worker.app.service import get_certificate, import_certificate

        self.step("A certificate to distribute")
        ca = _DemoAuthority()
        now = datetime.now(UTC)
        issued = ca.issue(
            COMMON_NAME, valid_from=now - timedelta(hours=1), valid_until=now + timedelta(days=90)
        )
        pki = self.data_dir / "pki"
        pki.mkdir(mode=0o700)
        for file_name, data in (("ca.pem", ca.cert_pem), ("www.pem", issued.cert_pem)):
            (pki / file_name).write_bytes(data)
        key_file = pki / "www.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(issued.key_pem)
        self.say(f"  generated a demo CA and a certificate for {COMMON_NAME} into {pki}")
        self.command(f"certs import --cert {pki}/www.pem --key {key_file} --ca {pki}/ca.pem")
        cert_id = import_certificate(self.rt, issued.cert_pem, issued.key_pem, b"", ca.cert_pem)
        view = get_certificate(self.rt, cert_id)
        self.new_serial = view.serial
        self.say(
            f"  imported certificate {cert_id}: CN {view.common_name}, serial {view.serial}, "
            f"valid until {view.not_after:%Y-%m-%d} (the private key is stored encrypted)"
        )
        return cert_id, ca

    def prepare_namespaces(self, ca: _DemoAuthority) -> None:
        from worker.app.service import add_kubeconfig_credential
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
        table = Table("cluster", "namespace", "existing Secret", "credential")
        for cluster in self.clusters:
            for tenant in TENANTS:
                namespace = self.namespace_of(tenant)
                _ensure_namespace(cluster.admin, namespace)
                cluster.namespaces.append(namespace)
                _put_secret(cluster.admin, namespace, self.secret_name, old)
                credential = f"{cluster.name}-{tenant}"
                add_kubeconfig_credential(
                    self.rt, credential, cluster.credential_for(namespace).encode("utf-8")
                )
                table.add_row(
                    cluster.name, namespace, f"{self.secret_name} (serial {old.serial})", credential
                )
                self.places.append((cluster, tenant, f"{cluster.name}-{tenant}"))
        self.command("credentials add-kubeconfig cluster-1-shop --file sa-kubeconfig.yaml")
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
        from worker.app.service import TargetSpec, create_target

        self.step("Targets: one per cluster and namespace (saving runs the health check)")
        namespace = self.namespace_template
        for _, tenant, name in self.places:
            self.command(
                f"targets add {name} --namespace '{namespace}' --var tenant={tenant} "
                f"--kubeconfig-credential {name} --adopt-unmanaged"
            )
            _, health = create_target(
                self.rt,
                TargetSpec(
                    name=name,
                    namespace=namespace,
                    credential=name,
                    adopt_unmanaged=True,
                    variables={"tenant": tenant},
                ),
            )
            if health is None or health.status != "healthy":
                message = health.message if health is not None else "not checked"
                raise DemoFailed(f"target {name} is not healthy: {message}")
            self.say(f"    health: [green]{health.status}[/] — {health.message}")
        self.say(
            "  --adopt-unmanaged: the namespaces already hold a Secret CertAutoPilot did not "
            "create; without the flag it refuses to overwrite it."
        )

    def create_group_and_attach(self, cert_id: str) -> str:
        from worker.app.service import attach, create_group, get_group

        self.step("A group, and the certificate attached to it")
        names = [name for _, _, name in self.places]
        self.command(
            f"groups create {GROUP} "
            + " ".join(f"--target {n}" for n in names)
            + f" --batch-size 1,50% --failure-threshold {FAILURE_THRESHOLD}"
        )
        create_group(
            self.rt, GROUP, names, batch_size=BATCH_SIZE, failure_threshold=FAILURE_THRESHOLD
        )
        group = get_group(self.rt, GROUP)
        for index, batch in enumerate(group.batches, start=1):
            self.say(f"    batch {index}: {', '.join(batch)}")
        self.say(
            f"  A canary batch of one target first, then half the group per batch. The run "
            f"halts if more than {FAILURE_THRESHOLD} of the targets fail, or every target of a "
            "batch fails; the rest are then skipped."
        )
        self.command(f"distributions attach {cert_id} --group {GROUP} --store-content")
        distribution_id = attach(self.rt, cert_id, group=GROUP, store_content=True)
        self.say(
            f"  distribution {distribution_id}; store content ON keeps each Secret as it was "
            "before the first write, which is what Rollback restores."
        )
        return distribution_id

    # ------------------------------------------------------------------------------ runs

    def follow(self, distribution_id: str, action: str) -> Any:
        from worker.app.service import enqueue_run, run_report

        words = {"dry_run": "--dry-run", "execute": "--execute"}
        self.command(
            f"run {distribution_id} {words[action]}"
            if action in words
            else f"rollback {distribution_id}"
        )
        run_id = enqueue_run(self.rt, self.dispatch, distribution_id, action)
        report = follow_run(
            lambda: run_report(self.rt, run_id),
            console=self.console,
            timeout=RUN_TIMEOUT,
            total_hint=len(self.places),
        )
        if report is None:
            raise DemoFailed(
                f"run {run_id} did not finish in {RUN_TIMEOUT:.0f}s:\n{self.worker_log_tail()}"
            )
        print_report(self.console, report, diffs=action == "dry_run", diff_limit=1)
        if report.state != "succeeded":
            raise DemoFailed(f"the {action} run ended {report.state}: {report.reason}")
        return report

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
            f"  [green]checked[/] in the clusters: all {len(self.places)} Secrets hold "
            f"serial {expect} ({meaning})."
        )

    def dry_run(self, distribution_id: str, *, expect: str, what: str) -> None:
        self.step(f"Dry-run of the {what}: the diff, and nothing written")
        self.follow(distribution_id, "dry_run")
        self.check_live(expect, "nothing was written")

    def execute(self, distribution_id: str, *, expect: str) -> None:
        self.step("Execute: write the Secrets, batch by batch")
        self.follow(distribution_id, "execute")
        self.check_live(expect, "the new certificate")
        self.say(
            "  Pods that mount the Secret as a volume see it within about a minute; pods "
            "reading it from environment variables need a restart (a webhook distribution "
            "stacked after this one can trigger that)."
        )

    def renew(self, cert_id: str, ca: _DemoAuthority, distribution_id: str) -> None:
        from worker.app.service import get_certificate, renew_certificate

        self.step("Renewal: a new certificate under the same id")
        now = datetime.now(UTC)
        renewed = ca.issue(
            COMMON_NAME, valid_from=now - timedelta(minutes=5), valid_until=now + timedelta(days=90)
        )
        before = get_certificate(self.rt, cert_id).serial
        self.command(f"certs renew {cert_id} --cert renewed.pem --key renewed.key")
        renew_certificate(self.rt, cert_id, {"cert": renewed.cert_pem, "key": renewed.key_pem})
        after = get_certificate(self.rt, cert_id).serial
        self.say(f"  serial {before} -> {after}; the distribution now delivers the renewal")
        current = self.new_serial
        self.new_serial = after
        self.dry_run(distribution_id, expect=current, what="renewal")
        self.execute(distribution_id, expect=after)

    def rollback(self, distribution_id: str) -> None:
        from models.rollback import STORE_CONTENT_OFF
        from worker.app.service import get_distribution

        self.step("Rollback: back to the Secrets as they were before CertAutoPilot")
        view = get_distribution(self.rt, distribution_id)
        self.say(f"  rollback button: {'enabled' if view.rollback_available else 'greyed out'}")
        self.say(f"  tooltip: {view.rollback_reason}")
        self.follow(distribution_id, "rollback")
        self.check_live(self.old_serial, "the hand-made Secret is back")
        self.say(
            "  With store content OFF the button is greyed out and `certautopilot rollback` "
            f'answers: "{STORE_CONTENT_OFF}"'
        )

    # --------------------------------------------------------------------------- cleanup

    def worker_log_tail(self, lines: int = 30) -> str:
        try:
            text = self.worker_log.read_text(errors="replace")
        except OSError:
            return "(no worker log)"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop the worker and clusters, delete what the demo created, restore the env."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        self.console.print()
        self.console.print(Rule("Cleaning up", align="left"))
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
        if self.rt is not None:
            from worker.platform.runtime import set_runtime

            set_runtime(None)
            self.rt.close()
        if self.testenv is not None:
            self.testenv.close()
            self.say("  stopped the local clusters")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.say(f"  removed {self.data_dir}")
        os.environ.pop("CAP_DATA_DIR", None)
        os.environ.update(self.saved_environ)


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
        console.print("\n[bold yellow]interrupted[/]: stopping everything the demo started")
        code = 130
    except DemoFailed as exc:
        console.print(f"[bold red]demo failed:[/] {exc}", highlight=False)
        code = 2 if isinstance(exc, DemoInputError) else 1
    finally:
        try:
            demo.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    if code == 0:
        console.print(
            f"\n[bold green]Demo finished in {elapsed:.0f}s.[/] Next: README.md → Quickstart to "
            "run it against your own clusters (`certautopilot demo --kubeconfig FILE`), and "
            "`certautopilot --help`."
        )
    return code
