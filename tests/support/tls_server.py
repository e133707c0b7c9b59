"""A small TLS server that serves the certificate of a Kubernetes Secret, for verify-serving.

Two behaviours, as real consumers have them:

* ``--mode reload`` watches the Secret through the API server's watch API (as nginx-ingress
  does) and swaps its TLS context on every change: new handshakes present the new leaf
  within moments of the write;
* ``--mode once`` reads the Secret once at start (a fallback self-signed certificate when it
  does not exist yet) and never again, like a controller that caches its configuration.

It binds 127.0.0.1 only, on a free port it writes to ``--port-file`` once it serves, answers
each connection with a handshake and closes it, and stops on SIGTERM. Run it as a real
process (``python -m tests.support.tls_server``); :class:`TlsServer` does that for tests and
the demo and stops it by its PID.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[2]


def _fallback() -> tuple[bytes, bytes]:
    """A throw-away "default certificate" (what an ingress serves before it has one)."""
    from tests.certfactory import make_chain

    chain = make_chain(cn="fallback.invalid", fresh_leaf_key=True)
    return chain.fullchain_pem, chain.key_pem


class _Server:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.context: ssl.SSLContext | None = None
        self.generation = 0
        self.lock = threading.Lock()

    def load(self, cert_pem: bytes, key_pem: bytes, origin: str) -> None:
        # ssl loads certificates from files only: a private folder (0700) of the test's.
        self.generation += 1
        cert_file = self.directory / f"cert-{self.generation}.pem"
        key_file = self.directory / f"key-{self.generation}.pem"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        cert_file.unlink()
        key_file.unlink()
        with self.lock:
            self.context = context
        print(f"serving the certificate from {origin}", flush=True)

    def handle(self, connection: socket.socket) -> None:
        with self.lock:
            context = self.context
        assert context is not None
        connection.settimeout(5)
        try:
            with context.wrap_socket(connection, server_side=True):
                pass  # the handshake is all a verify-serving probe asks for
        except (OSError, ssl.SSLError):
            pass
        finally:
            connection.close()


def _secret_pems(api: object, namespace: str, name: str) -> tuple[bytes, bytes] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        secret = api.read_namespaced_secret(name, namespace)  # type: ignore[attr-defined]
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return _pems(secret)


def _pems(secret: object) -> tuple[bytes, bytes] | None:
    data = getattr(secret, "data", None) or {}
    if "tls.crt" not in data or "tls.key" not in data:
        return None
    return base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"])


def _watch(server: _Server, api: object, namespace: str, name: str) -> None:
    """Follow the Secret through the API server's watch API; reload on every change."""
    from kubernetes import watch

    version = ""
    while True:
        try:
            stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                api.list_namespaced_secret,  # type: ignore[attr-defined]
                namespace,
                field_selector=f"metadata.name={name}",
                resource_version=version or None,
                timeout_seconds=60,
            )
            for event in stream:
                secret = event["object"]
                version = secret.metadata.resource_version
                pems = _pems(secret) if event["type"] in ("ADDED", "MODIFIED") else None
                if pems is not None:
                    server.load(*pems, f"Secret {namespace}/{name} rv {version} (watch)")
        except Exception as exc:
            print(f"watch interrupted ({type(exc).__name__}); re-watching", flush=True)
            version = ""
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--mode", choices=("reload", "once"), required=True)
    parser.add_argument("--port-file", required=True, type=Path)
    args = parser.parse_args(argv)

    from kubernetes import client, config

    loaded = config.new_client_from_config(config_file=str(args.kubeconfig))  # type: ignore[no-untyped-call]
    api = client.CoreV1Api(loaded)
    with tempfile.TemporaryDirectory(prefix="tls-server-") as folder:
        server = _Server(Path(folder))
        pems = _secret_pems(api, args.namespace, args.secret)
        if pems is None:
            server.load(*_fallback(), "the fallback (no Secret yet)")
        else:
            server.load(*pems, f"Secret {args.namespace}/{args.secret} (read once at start)")
        if args.mode == "reload":
            threading.Thread(
                target=_watch, args=(server, api, args.namespace, args.secret), daemon=True
            ).start()
        listener = socket.create_server(("127.0.0.1", 0))
        stopping = threading.Event()

        def stop(_signal: int, _frame: FrameType | None) -> None:
            stopping.set()
            listener.close()

        signal.signal(signal.SIGTERM, stop)
        port = listener.getsockname()[1]
        args.port_file.write_text(str(port))
        print(f"listening on 127.0.0.1:{port} ({args.mode})", flush=True)
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                break
            threading.Thread(target=server.handle, args=(connection,), daemon=True).start()
    return 0


class TlsServer:
    """``python -m tests.support.tls_server`` as a real process, stopped by its PID."""

    def __init__(
        self, kubeconfig: str, namespace: str, secret: str, *, mode: str, folder: Path
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.name = f"tls-{mode}-{secret}"
        kubeconfig_file = folder / f"{self.name}.kubeconfig"
        kubeconfig_file.write_text(kubeconfig)
        kubeconfig_file.chmod(0o600)
        self._port_file = folder / f"{self.name}.port"
        self._port_file.unlink(missing_ok=True)
        self.log_path = folder / f"{self.name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.tls_server",
                "--kubeconfig",
                str(kubeconfig_file),
                "--namespace",
                namespace,
                "--secret",
                secret,
                "--mode",
                mode,
                "--port-file",
                str(self._port_file),
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.port = self._wait_for_port()

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:<port>``, what ``--verify-serving`` takes."""
        return f"127.0.0.1:{self.port}"

    def _wait_for_port(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_text()}")
            if self._port_file.exists() and self._port_file.read_text().strip():
                return int(self._port_file.read_text())
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        """What the server printed (which certificate it loaded, and when)."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 10 s."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


if __name__ == "__main__":
    sys.exit(main())
