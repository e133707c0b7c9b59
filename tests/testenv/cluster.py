"""Independent Kubernetes API servers sharing one etcd, started the way envtest starts them.

One etcd on loopback; N kube-apiservers, each with its own ``--etcd-prefix``, serving CA and
certificate (SAN 127.0.0.1 and localhost), client CA and admin client certificate (group
``system:masters``), and service-account signing key and issuer. No controller manager runs,
so (as in envtest) nothing creates default ServiceAccounts or finalizes deleted namespaces.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.testenv.binaries import Binaries
from tests.testenv.pki import CertificateAuthority, new_private_key, private_key_pem, public_key_pem
from tests.testenv.process import ManagedProcess, StartupError, free_port, free_port_on

APISERVER_START_TIMEOUT = 180.0
ETCD_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Cluster:
    """A running test cluster: API URL, serving CA, admin kubeconfig with inline data."""

    name: str
    server: str
    ca_pem: str = field(repr=False)
    admin_kubeconfig: str = field(repr=False)
    issuer: str
    # Files for clients that need paths (urllib3 loads client certificates only from files).
    ca_file: Path = field(repr=False)
    admin_cert_file: Path = field(repr=False)
    admin_key_file: Path = field(repr=False)

    @property
    def host(self) -> str:
        """The address the API server listens on (loopback, or the node cluster's interface)."""
        return self.server.removeprefix("https://").rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        """The API server's secure port."""
        return int(self.server.rsplit(":", 1)[1])


def admin_kubeconfig(name: str, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> str:
    """Return a kubeconfig YAML whose CA, client certificate and key are inline (base64) data."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}
        ],
        "users": [
            {
                "name": f"{name}-admin",
                "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin"}}],
        "current-context": name,
        "preferences": {},
    }
    return yaml.safe_dump(config, sort_keys=False)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


class Etcd:
    """A single-member etcd on loopback with its data in `workdir`."""

    def __init__(self, binary: Path, workdir: Path, logs: Path) -> None:
        self.client_port = free_port()
        peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            "etcd",
            [
                str(binary),
                "--name=testenv",
                f"--data-dir={workdir / 'data'}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=testenv={peer_url}",
                # Test data is disposable: skip fsync, as envtest does.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            logs / "etcd.log",
            cwd=workdir,
        )

    def start(self) -> None:
        """Start etcd and wait until /health reports healthy."""
        self.process.start()
        self.process.wait_until_ready(self._healthy, ETCD_START_TIMEOUT, "healthy on /health")

    def _healthy(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=2)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            body = response.read()
        except OSError:
            return False
        finally:
            connection.close()
        if response.status != 200:
            return False
        return bool(json.loads(body).get("health") == "true")

    def stop(self) -> None:
        """Stop etcd."""
        self.process.stop()


class ApiServer:
    """One kube-apiserver acting as an independent cluster named `name`."""

    def __init__(
        self,
        name: str,
        binary: Path,
        etcd_url: str,
        workdir: Path,
        logs: Path,
        extra_args: Sequence[str] = (),
        *,
        address: str = "127.0.0.1",
        service_ip: str | None = None,
    ) -> None:
        """`address` and `service_ip` make a node cluster (tests/testenv/node.py): the server
        listens on the host's interface, keeps the `kubernetes` Service's endpoints (pods reach
        it at `service_ip`), admits pods with their ServiceAccount and authorizes kubelets
        with the Node authorizer. Without them it is an envtest-like loopback server."""
        self.name = name
        self.port = free_port() if address == "127.0.0.1" else free_port_on(address)
        self.server = f"https://{address}:{self.port}"
        self.issuer = f"https://{name}.test"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

        serving_ca = CertificateAuthority(f"{name} serving CA")
        if service_ip is None:
            serving = serving_ca.issue_serving("kube-apiserver")
            mode_args = [
                "--authorization-mode=RBAC",
                # As in envtest: no controller creates the "default" ServiceAccount, so the
                # admission plugin that requires it would reject every pod.
                "--disable-admission-plugins=ServiceAccount",
                # Loopback may not appear in the "kubernetes" Service's endpoints; nothing
                # here routes through that Service, so do not maintain it.
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
            ]
        else:
            serving = serving_ca.issue_serving(
                "kube-apiserver",
                dns_names=("localhost", "kubernetes", "kubernetes.default",
                           "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
                ip_addresses=("127.0.0.1", address, service_ip),
            )  # fmt: skip
            mode_args = [
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-cluster-ip-range={ipaddress.ip_interface(service_ip + '/24').network}",
                # kubectl logs / exec reach the kubelet on the node's InternalIP.
                "--kubelet-preferred-address-types=InternalIP",
            ]
        client_ca = CertificateAuthority(f"{name} client CA")
        self.client_ca = client_ca
        admin = client_ca.issue_client("testenv-admin", organizations=["system:masters"])
        sa_key = new_private_key()

        self.ca_pem = serving_ca.cert_pem
        self._admin_cert_pem = admin.cert_pem
        self._admin_key_pem = admin.key_pem
        self.ca_file = _write(workdir / "ca.crt", serving_ca.cert_pem)
        self.admin_cert_file = _write(workdir / "admin.crt", admin.cert_pem)
        self.admin_key_file = _write(workdir / "admin.key", admin.key_pem)
        files = {
            "serving.crt": serving.cert_pem,
            "serving.key": serving.key_pem,
            "client-ca.crt": client_ca.cert_pem,
            "sa.key": private_key_pem(sa_key),
            "sa.pub": public_key_pem(sa_key),
        }
        for file_name, data in files.items():
            _write(workdir / file_name, data)

        self.process = ManagedProcess(
            f"kube-apiserver {name}",
            [
                str(binary),
                f"--etcd-servers={etcd_url}",
                # Separate key spaces in the shared etcd make the clusters independent.
                f"--etcd-prefix=/{name}",
                f"--bind-address={address}",
                f"--advertise-address={address}",
                f"--secure-port={self.port}",
                f"--cert-dir={workdir}",
                f"--tls-cert-file={workdir / 'serving.crt'}",
                f"--tls-private-key-file={workdir / 'serving.key'}",
                f"--client-ca-file={workdir / 'client-ca.crt'}",
                f"--service-account-issuer={self.issuer}",
                f"--api-audiences={self.issuer}",
                f"--service-account-key-file={workdir / 'sa.pub'}",
                f"--service-account-signing-key-file={workdir / 'sa.key'}",
                "--allow-privileged=true",
                *mode_args,
                *extra_args,
            ],
            logs / f"kube-apiserver-{name}.log",
            cwd=workdir,
        )

    def start(self) -> None:
        """Start the process without waiting (so several servers boot in parallel)."""
        self.process.start()

    def wait_ready(self, timeout: float = APISERVER_START_TIMEOUT) -> None:
        """Wait until /readyz answers 200 (all post-start hooks, RBAC bootstrap included)."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        context.load_cert_chain(self.admin_cert_file, self.admin_key_file)

        host = self.server.removeprefix("https://").rsplit(":", 1)[0]

        def ready() -> bool:
            connection = http.client.HTTPSConnection(host, self.port, context=context, timeout=5)
            try:
                connection.request("GET", "/readyz")
                return connection.getresponse().status == 200
            except OSError:
                return False
            finally:
                connection.close()

        self.process.wait_until_ready(ready, timeout, "ready on /readyz")

    def cluster(self) -> Cluster:
        """Describe this server as a `Cluster`."""
        return Cluster(
            name=self.name,
            server=self.server,
            ca_pem=self.ca_pem.decode("ascii"),
            admin_kubeconfig=admin_kubeconfig(
                self.name, self.server, self.ca_pem, self._admin_cert_pem, self._admin_key_pem
            ),
            issuer=self.issuer,
            ca_file=self.ca_file,
            admin_cert_file=self.admin_cert_file,
            admin_key_file=self.admin_key_file,
        )

    def stop(self) -> None:
        """Stop the server."""
        self.process.stop()


class ClusterSet:
    """One etcd plus `count` API servers; `start()` boots them, `stop()` stops them all."""

    def __init__(self, binaries: Binaries, workdir: Path, count: int) -> None:
        if count < 1:
            raise ValueError(f"need at least one cluster, got {count}")
        self._binaries = binaries
        self._workdir = workdir
        self._count = count
        self._etcd: Etcd | None = None
        self._servers: list[ApiServer] = []
        self.clusters: list[Cluster] = []
        self.startup_seconds = 0.0

    def start(self) -> list[Cluster]:
        """Start etcd, then every API server in parallel; return the clusters once all are ready."""
        started = time.monotonic()
        logs = self._workdir / "logs"
        try:
            self._etcd = Etcd(self._binaries.etcd, self._workdir / "etcd", logs)
            self._etcd.start()
            self._servers = [
                ApiServer(
                    f"cluster-{index}",
                    self._binaries.kube_apiserver,
                    self._etcd.url,
                    self._workdir / f"cluster-{index}",
                    logs,
                )
                for index in range(1, self._count + 1)
            ]
            for server in self._servers:
                server.start()
            for server in self._servers:
                server.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.clusters = [server.cluster() for server in self._servers]
        self.startup_seconds = time.monotonic() - started
        return self.clusters

    @property
    def etcd_url(self) -> str:
        """The shared etcd's client URL (a node cluster keeps its data there too)."""
        if self._etcd is None:
            raise RuntimeError("the cluster set is not started")
        return self._etcd.url

    def processes(self) -> list[ManagedProcess]:
        """The etcd and API server processes."""
        found = [server.process for server in self._servers]
        if self._etcd is not None:
            found.append(self._etcd.process)
        return found

    def stop(self) -> None:
        """Stop every API server (in parallel), then etcd."""
        for server in self._servers:
            server.process.request_stop()
        for server in self._servers:
            server.stop()
        if self._etcd is not None:
            self._etcd.stop()


__all__ = ["ApiServer", "Cluster", "ClusterSet", "Etcd", "StartupError", "admin_kubeconfig"]
