"""Fault injectors for integration tests: real sockets in front of real servers, no mocks.

* :class:`TcpGate` relays a loopback port to a server (PostgreSQL, an apiserver) and can be
  *cut*: the listening socket is closed (new connections are refused, as from a stopped
  server) and every relayed connection is dropped; :meth:`TcpGate.restore` listens again on
  the same port. TLS passes through untouched.
* :class:`FaultyApiProxy` terminates TLS with its own test CA and re-originates each request
  to a kube-apiserver (verifying the apiserver's CA), so it can answer ``429``/``500`` instead
  of forwarding, for a number of requests or for a while. A worker reaches it through
  :func:`proxied_kubeconfig`, a token kubeconfig whose server and CA are the proxy's. (A TCP
  relay cannot inject HTTP status codes into TLS, hence the termination.)
* :func:`seed_previous_secrets` creates the Secrets a run finds already there, written
  earlier with another certificate: the content a failed target must keep and a rollback
  snapshot must hold.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.certfactory import Chain, make_chain
from tests.testenv.pki import CertificateAuthority
from worker.core.bundle import build_bundle
from worker.core.secret import desired_secret

# Hop-by-hop headers a proxy must not forward (RFC 9110 section 7.6.1).
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)


class TcpGate:
    """A loopback TCP relay to ``upstream`` that can refuse and drop connections on demand."""

    def __init__(
        self, upstream_host: str, upstream_port: int, *, stable_port: bool = False
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self.port = 0
        self.cuts = 0
        if stable_port:
            self._listen_below_ephemeral_range()
        else:
            self._listen()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener

    def _listen_below_ephemeral_range(self) -> None:
        # An ephemeral port, once cut, can be taken by any outgoing connection before
        # restore() binds it again; ports below the kernel's ephemeral range are not handed
        # out that way (gates cut and restored many times: the randomized fault test).
        low = _ephemeral_range()[0]
        ports = list(range(max(1024, low - 12_000), low))
        random.SystemRandom().shuffle(ports)
        for port in ports[:200]:
            self.port = port
            try:
                self._listen()
                return
            except OSError:
                continue
        raise OSError(f"no free loopback port below the ephemeral range (from {low})")

    @property
    def is_open(self) -> bool:
        """True while connections are accepted and relayed."""
        with self._lock:
            return self._listener is not None

    def cut(self) -> None:
        """Refuse new connections and drop every open one (a stopped server, seen from outside)."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
            self.cuts += 1
        if listener is not None:
            listener.close()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        """Accept and relay again, on the same port."""
        # The acceptor thread may still be inside accept() on the closed listener for up to
        # its 0.1 s timeout, which keeps the port bound: retry the bind briefly.
        deadline = time.monotonic() + 2.0
        while not self.is_open:
            try:
                self._listen()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        """Stop relaying for good."""
        self._stopping.set()
        self.cut()
        self._acceptor.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if self._listener is None:  # cut while connecting
                    client.close()
                    server.close()
                    continue
                self._connections.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._connections.discard(source)
                self._connections.discard(sink)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; a default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


class _Injection:
    """Which answers to fake: ``status`` for the next ``count`` requests or until ``until``."""

    def __init__(self) -> None:
        self.status = 0
        self.remaining = 0
        self.until = 0.0
        self.retry_after: int | None = None
        self.matches: Callable[[str, str], bool] = lambda method, path: True

    def take(self, method: str, path: str) -> tuple[int, int | None] | None:
        if not self.status or not self.matches(method, path):
            return None
        if self.remaining > 0:
            self.remaining -= 1
            return self.status, self.retry_after
        if time.monotonic() < self.until:
            return self.status, self.retry_after
        return None


class FaultyApiProxy:
    """An HTTPS reverse proxy to one apiserver that can answer 429/500 instead of forwarding."""

    def __init__(self, upstream_server: str, upstream_ca_pem: str, workdir: Path | None = None):
        parts = upstream_server.removeprefix("https://").rsplit(":", 1)
        self._upstream = (parts[0], int(parts[1]))
        self._upstream_tls = ssl.create_default_context(cadata=upstream_ca_pem)
        self.ca = CertificateAuthority("CertAutoPilot fault-proxy CA")
        serving = self.ca.issue_serving("fault-proxy")
        self._lock = threading.Lock()
        self._injection = _Injection()
        #: Seconds every forwarded request is held first (keeps tasks in flight for tests).
        self.latency = 0.0
        #: Called with (method, path, status) after upstream answered, before the client hears.
        self.after_forward: Callable[[str, str, int], None] | None = None
        #: Every request seen: (method, path, status answered, injected?).
        self.log: list[tuple[str, str, int, bool]] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # load_cert_chain reads files only; they live for the blink of this call.
        with tempfile.TemporaryDirectory(dir=workdir) as folder:
            cert_file, key_file = Path(folder, "tls.crt"), Path(folder, "tls.key")
            cert_file.write_bytes(serving.cert_pem)
            key_file.write_bytes(serving.key_pem)
            key_file.chmod(0o600)
            context.load_cert_chain(cert_file, key_file)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.server = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def ca_pem(self) -> str:
        """The CA a client must trust to talk to the proxy."""
        return self.ca.cert_pem.decode("ascii")

    def inject(
        self,
        status: int,
        *,
        count: int = 0,
        seconds: float = 0.0,
        retry_after: int | None = None,
        matches: Callable[[str, str], bool] | None = None,
    ) -> None:
        """Answer ``status`` to the next ``count`` requests, or to every request for ``seconds``."""
        with self._lock:
            injection = _Injection()
            injection.status = status
            injection.remaining = count
            injection.until = time.monotonic() + seconds
            injection.retry_after = retry_after
            if matches is not None:
                injection.matches = matches
            self._injection = injection

    def heal(self) -> None:
        """Forward every request again."""
        with self._lock:
            self._injection = _Injection()

    def injected(self) -> int:
        """How many answers were faked so far."""
        with self._lock:
            return sum(1 for entry in self.log if entry[3])

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, method: str, path: str) -> tuple[int, int | None] | None:
        with self._lock:
            return self._injection.take(method, path)

    def _record(self, method: str, path: str, status: int, injected: bool) -> None:
        with self._lock:
            self.log.append((method, path, status, injected))

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPSConnection(
            *self._upstream, context=self._upstream_tls, timeout=30
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._decide(self.command, self.path)
                if fault is not None:
                    status, retry_after = fault
                    payload = (
                        b'{"kind":"Status","apiVersion":"v1","status":"Failure",'
                        b'"message":"injected by the fault proxy","reason":"%s","code":%d}'
                        % (b"TooManyRequests" if status == 429 else b"InternalError", status)
                    )
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if retry_after is not None:
                        self.send_header("Retry-After", str(retry_after))
                    self.end_headers()
                    self._write(payload)
                    proxy._record(self.command, self.path, status, True)
                    return
                if proxy.latency:
                    time.sleep(proxy.latency)
                headers = {
                    key: value
                    for key, value in self.headers.items()
                    if key.lower() not in _HOP_BY_HOP
                }
                try:
                    status, answer_headers, payload = proxy._forward(
                        self.command, self.path, headers, body
                    )
                except OSError:
                    status, answer_headers, payload = 502, [], b""
                if proxy.after_forward is not None:
                    # Before the client sees the answer: what the hook changes makes the
                    # answer stale by construction (a deterministic race).
                    proxy.after_forward(self.command, self.path, status)
                self.send_response(status)
                for key, value in answer_headers:
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self._write(payload)
                proxy._record(self.command, self.path, status, False)

            def _write(self, payload: bytes) -> None:
                try:
                    self.wfile.write(payload)
                except OSError:
                    self.close_connection = True  # the client gave up (timeout, worker killed)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass  # requests carry bearer tokens in headers; never print them

        return Handler


def proxied_kubeconfig(kubeconfig: str, server: str, ca_pem: str) -> str:
    """The same kubeconfig pointed at another endpoint (``server``) trusting ``ca_pem``."""
    config = yaml.safe_load(kubeconfig)
    for entry in config["clusters"]:
        entry["cluster"]["server"] = server
        entry["cluster"]["certificate-authority-data"] = base64.b64encode(
            ca_pem.encode("ascii")
        ).decode("ascii")
    return yaml.safe_dump(config, sort_keys=False)


def gated_kubeconfig(kubeconfig: str, gate: TcpGate) -> str:
    """The same kubeconfig reaching its apiserver through ``gate`` (TLS passes through)."""
    config = yaml.safe_load(kubeconfig)
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{gate.port}"
    return yaml.safe_dump(config, sort_keys=False)


def managed_secret(name: str, namespace: str, chain: Chain, distribution_id: str) -> dict[str, Any]:
    """The Secret CertAutoPilot would write for ``chain`` (an earlier write, for test setup)."""
    bundle = build_bundle(chain.leaf_pem, chain.key_pem, chain.chain_pem, now=datetime.now(UTC))
    return desired_secret(
        name=name,
        namespace=namespace,
        tls_crt=bundle.tls_crt(),
        tls_key=bundle.tls_key(),
        ca_crt=None,
        leaf=bundle.leaf,
        distribution_id=distribution_id,
    )


def seed_previous_secrets(
    admin_api: Callable[[Any], Any],
    placements: Iterable[tuple[Any, str, str]],
    distribution_id: str,
) -> Chain:
    """Create each (cluster, namespace, name) Secret with an older certificate written by
    ``distribution_id``: the previous content a run must replace, snapshot or leave alone."""
    from kubernetes import client as k8s

    old = make_chain(cn="shop.example.com", fresh_leaf_key=True)
    for cluster, namespace, name in placements:
        body = managed_secret(name, namespace, old, distribution_id)
        k8s.CoreV1Api(admin_api(cluster)).create_namespaced_secret(namespace, body)
    return old


def build_faulty_fleet(
    pipe: Any,
    clusters: Sequence[Any],
    make_service_account: Any,
    namespace: str,
    *,
    targets: int,
    proxy_for: Mapping[str, FaultyApiProxy] | None = None,
    gate_for: Mapping[str, TcpGate] | None = None,
    **options: Any,
) -> Any:
    """A fleet (tests.support.pipeline.build_fleet) whose kubeconfigs may lead through a fault
    proxy or a gate per cluster name."""
    from tests.support.pipeline import build_fleet

    kubeconfigs: dict[str, str] = {}
    for cluster in clusters:
        kubeconfig = make_service_account(cluster, namespace).kubeconfig
        if proxy_for and cluster.name in proxy_for:
            proxy = proxy_for[cluster.name]
            kubeconfig = proxied_kubeconfig(kubeconfig, proxy.server, proxy.ca_pem)
        if gate_for and cluster.name in gate_for:
            kubeconfig = gated_kubeconfig(kubeconfig, gate_for[cluster.name])
        kubeconfigs[cluster.name] = kubeconfig
    return build_fleet(
        pipe,
        list(clusters),
        make_service_account,
        targets=targets,
        namespace=namespace,
        kubeconfigs=kubeconfigs,
        **options,
    )
