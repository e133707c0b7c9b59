"""Connecting to a cluster: vet a kubeconfig, detect in-cluster mode, build and cache API clients.

Three rules shape this module (DESIGN.md decisions 6 and 7):

* A stored kubeconfig may neither run programs nor read local files. ``exec``,
  ``auth-provider`` and path fields are refused, as in Flux's fix for CVE-2022-24817;
  anything the module does not understand is refused too rather than silently ignored.
* Key material never lands on persistent disk. The client library would write inline
  client certificates to temp files; instead the TLS context is built here, the CA from
  memory and the client certificate through a sealed-off ``memfd`` that is closed at once.
* The client library's process-wide default configuration is never read or changed: every
  client gets its own ``Configuration`` and its own urllib3 pool.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3
import yaml
from kubernetes.client import ApiClient, Configuration

from worker.kube.errors import InClusterUnavailable, KubeconfigRejected

__all__ = [
    "ClientCache",
    "ConnectionSpec",
    "KubeApiClient",
    "RotatingTokenFile",
    "build_api_client",
    "in_cluster_available",
    "in_cluster_spec",
    "vet_kubeconfig",
]

#: How often a mounted ServiceAccount token is re-read even when its mtime did not change.
TOKEN_MAX_AGE_SECONDS = 60.0

_USER_FIELDS_REFUSED: dict[str, str] = {
    "exec": "runs a local program to obtain credentials",
    "auth-provider": "runs a local auth-provider plugin to obtain credentials",
    "client-certificate": "reads the client certificate from a local file path",
    "client-key": "reads the client key from a local file path",
    "tokenFile": "reads the token from a local file path",
    "username": "uses username/password basic authentication, which is unsupported",
    "password": "uses username/password basic authentication, which is unsupported",
    "as": "impersonates another user, which is unsupported",
    "as-uid": "impersonates another user, which is unsupported",
    "as-groups": "impersonates groups, which is unsupported",
    "as-user-extra": "impersonates another user, which is unsupported",
}
_USER_FIELDS_ALLOWED = frozenset(
    {"token", "client-certificate-data", "client-key-data", "extensions"}
)

_CLUSTER_FIELDS_REFUSED: dict[str, str] = {
    "certificate-authority": "reads the CA from a local file path",
    "proxy-url": "routes through a proxy, which is unsupported",
}
_CLUSTER_FIELDS_ALLOWED = frozenset(
    {
        "server",
        "certificate-authority-data",
        "tls-server-name",
        "insecure-skip-tls-verify",
        "disable-compression",
        "extensions",
    }
)


@dataclass(frozen=True)
class ConnectionSpec:
    """Everything needed to reach one API server; secrets are excluded from the repr."""

    server: str
    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = field(default=None, repr=False)
    client_key_pem: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    insecure: bool = False
    #: Called before each request to get the current bearer token (in-cluster rotation).
    token_provider: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    def content_hash(self) -> str:
        """Return a SHA-256 over every field that changes the connection (for client caching)."""
        digest = hashlib.sha256()
        for part in (
            self.server,
            self.ca_pem,
            self.client_cert_pem,
            self.client_key_pem,
            self.token,
            self.tls_server_name,
            str(self.insecure),
            repr(getattr(self.token_provider, "cache_key", None)),
        ):
            raw = part.encode() if isinstance(part, str) else (part or b"")
            digest.update(len(raw).to_bytes(8, "big"))
            digest.update(raw)
        return digest.hexdigest()


def _reject(message: str, field_path: str) -> KubeconfigRejected:
    return KubeconfigRejected(f"kubeconfig rejected: {field_path} {message}", field=field_path)


def _named_entry(entries: Any, name: str, section: str, inner: str) -> dict[str, Any]:
    if not isinstance(entries, list):
        raise _reject(f"is missing (no {section} list); the kubeconfig needs one", section)
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(inner)
            if not isinstance(body, dict):
                raise _reject("is missing or not a mapping", f"{section}[{name}].{inner}")
            return body
    raise _reject(f'has no entry named "{name}" (the context refers to it)', section)


def _inline_data(body: Mapping[str, Any], key: str, path: str, marker: str) -> bytes | None:
    value = body.get(key)
    if value is None:
        return None
    try:
        data = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise _reject("is not valid base64", path) from None
    if marker.encode() not in data:
        raise _reject(f"does not hold PEM data ({marker} ... block expected)", path)
    return data


def vet_kubeconfig(
    text: str | bytes, *, allow_insecure: bool = False, context: str | None = None
) -> ConnectionSpec:
    """Parse a kubeconfig in memory and return its connection, refusing anything unsafe."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        # The YAML error could quote a line holding key data; keep only its position.
        raise KubeconfigRejected(
            "kubeconfig rejected: the text is not valid YAML", field="(document)"
        ) from None
    if not isinstance(doc, dict):
        raise KubeconfigRejected(
            "kubeconfig rejected: the text is not a kubeconfig (expected a YAML mapping with "
            "clusters, users, contexts and current-context)",
            field="(document)",
        )
    context_name = context if context is not None else doc.get("current-context")
    if not context_name:
        raise _reject("is empty; name the context to use", "current-context")
    ctx = _named_entry(doc.get("contexts"), str(context_name), "contexts", "context")
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    if not cluster_name:
        raise _reject("is missing", f"contexts[{context_name}].context.cluster")
    if not user_name:
        raise _reject("is missing", f"contexts[{context_name}].context.user")
    cluster = _named_entry(doc.get("clusters"), str(cluster_name), "clusters", "cluster")
    user = _named_entry(doc.get("users"), str(user_name), "users", "user")

    cluster_path = f"clusters[{cluster_name}].cluster"
    user_path = f"users[{user_name}].user"
    for key in cluster:
        if key in _CLUSTER_FIELDS_REFUSED:
            raise _reject(_CLUSTER_FIELDS_REFUSED[key], f"{cluster_path}.{key}")
        if key not in _CLUSTER_FIELDS_ALLOWED:
            raise _reject("is not supported by CertAutoPilot", f"{cluster_path}.{key}")
    for key in user:
        if key in _USER_FIELDS_REFUSED:
            raise _reject(_USER_FIELDS_REFUSED[key], f"{user_path}.{key}")
        if key not in _USER_FIELDS_ALLOWED:
            raise _reject("is not supported by CertAutoPilot", f"{user_path}.{key}")

    server = str(cluster.get("server") or "")
    if not server:
        raise _reject("is missing", f"{cluster_path}.server")
    parts = urlsplit(server)
    if parts.scheme != "https" or not parts.hostname:
        raise _reject(
            f'must be an https:// URL with a host (got "{server}"); plain http is refused',
            f"{cluster_path}.server",
        )
    insecure = cluster.get("insecure-skip-tls-verify") is True
    if insecure and not allow_insecure:
        raise _reject(
            "disables TLS verification; put the CA in certificate-authority-data, or allow "
            "insecure connections on the target explicitly",
            f"{cluster_path}.insecure-skip-tls-verify",
        )
    ca_pem = _inline_data(
        cluster,
        "certificate-authority-data",
        f"{cluster_path}.certificate-authority-data",
        "-----BEGIN CERTIFICATE-----",
    )
    cert_pem = _inline_data(
        user,
        "client-certificate-data",
        f"{user_path}.client-certificate-data",
        "-----BEGIN CERTIFICATE-----",
    )
    key_pem = _inline_data(
        user, "client-key-data", f"{user_path}.client-key-data", "PRIVATE KEY-----"
    )
    if (cert_pem is None) != (key_pem is None):
        missing = "client-key-data" if key_pem is None else "client-certificate-data"
        raise _reject(
            "is missing (client certificate and key come as a pair)", f"{user_path}.{missing}"
        )
    token = user.get("token")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise _reject("is empty or not a string", f"{user_path}.token")
    if cert_pem is None and token is None:
        raise _reject(
            "has no credentials (needs token, or client-certificate-data with client-key-data)",
            user_path,
        )
    tls_server_name = cluster.get("tls-server-name")
    return ConnectionSpec(
        server=server.rstrip("/"),
        ca_pem=ca_pem,
        client_cert_pem=cert_pem,
        client_key_pem=key_pem,
        token=token.strip() if isinstance(token, str) else None,
        tls_server_name=str(tls_server_name) if tls_server_name else None,
        insecure=insecure,
    )


class RotatingTokenFile:
    """Callable returning a mounted token, re-read when the file changes or every 60 seconds."""

    def __init__(
        self,
        path: Path,
        *,
        max_age: float = TOKEN_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._mtime_ns: int | None = None
        self._read_at = 0.0
        #: Part of ConnectionSpec.content_hash: the token itself rotates, the file does not.
        self.cache_key = f"token-file:{path}"

    def __repr__(self) -> str:
        return f"RotatingTokenFile({str(self.path)!r})"

    def __call__(self) -> str:
        """Return the current token (kubelet rotates bound tokens by swapping the file)."""
        with self._lock:
            try:
                mtime_ns = self.path.stat().st_mtime_ns
                stale = (
                    self._token is None
                    or mtime_ns != self._mtime_ns
                    or self._clock() - self._read_at >= self.max_age
                )
                if stale:
                    token = self.path.read_text(encoding="utf-8").strip()
                    if token:
                        self._token, self._mtime_ns, self._read_at = token, mtime_ns, self._clock()
            except OSError:
                # Mid-rotation the file may briefly vanish; the last token is still valid.
                if self._token is None:
                    raise InClusterUnavailable(
                        f"the ServiceAccount token file {self.path} cannot be read"
                    ) from None
            if self._token is None:
                raise InClusterUnavailable(f"the ServiceAccount token file {self.path} is empty")
            return self._token


def in_cluster_spec(sa_dir: Path, environ: Mapping[str, str]) -> ConnectionSpec:
    """Return the in-cluster connection (service host + mounted token and CA), or refuse clearly."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = environ.get("KUBERNETES_SERVICE_PORT", "").strip()
    if not host or not port:
        raise InClusterUnavailable(
            "in-cluster mode is unavailable: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are "
            "not set, so this process is not running inside a Kubernetes pod"
        )
    token_path, ca_path = sa_dir / "token", sa_dir / "ca.crt"
    for path, what in ((token_path, "token"), (ca_path, "CA certificate")):
        if not path.is_file():
            raise InClusterUnavailable(
                f"in-cluster mode is unavailable: the ServiceAccount {what} {path} does not exist "
                "(is automountServiceAccountToken off, or CAP_SERVICEACCOUNT_DIR wrong?)"
            )
    try:
        ca_pem = ca_path.read_bytes()
    except OSError as exc:
        raise InClusterUnavailable(
            f"in-cluster mode is unavailable: {ca_path} cannot be read ({exc.strerror})"
        ) from None
    provider = RotatingTokenFile(token_path)
    provider()  # fail now, at save time, rather than on the first request
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return ConnectionSpec(
        server=f"https://{bracketed}:{port}", ca_pem=ca_pem, token_provider=provider
    )


def in_cluster_available(sa_dir: Path, environ: Mapping[str, str]) -> bool:
    """Return whether this process runs in Kubernetes with a usable ServiceAccount mount."""
    try:
        in_cluster_spec(sa_dir, environ)
    except InClusterUnavailable:
        return False
    return True


def _no_password() -> bytes:
    # A key with a passphrase cannot be used unattended; never let OpenSSL prompt on a tty.
    return b""


def _ssl_context(spec: ConnectionSpec) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(
            cadata=spec.ca_pem.decode("ascii") if spec.ca_pem else None
        )
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise KubeconfigRejected(
            "kubeconfig rejected: certificate-authority-data is not a usable PEM CA certificate",
            field="certificate-authority-data",
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if spec.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.client_cert_pem is not None and spec.client_key_pem is not None:
        _load_client_cert(ctx, spec.client_cert_pem, spec.client_key_pem)
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl can only load a certificate chain from a path. A memfd is an anonymous file in
    # memory: reachable as /proc/self/fd/N while open, gone when closed, never on disk.
    fd = os.memfd_create("certautopilot-client-cert", os.MFD_CLOEXEC)
    try:
        payload = cert_pem.rstrip(b"\n") + b"\n" + key_pem
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=_no_password)
    except ssl.SSLError:
        raise KubeconfigRejected(
            "kubeconfig rejected: client-certificate-data / client-key-data cannot be loaded "
            "(the key does not match the certificate, is encrypted, or is not PEM)",
            field="client-key-data",
        ) from None
    finally:
        os.close(fd)


class KubeApiClient(ApiClient):
    """An ApiClient that also carries its (connect, read) timeouts for :class:`KubeClient`."""

    request_timeout: tuple[float, float]
    server: str


def build_api_client(
    spec: ConnectionSpec, *, connect_timeout: float, read_timeout: float
) -> KubeApiClient:
    """Return a dedicated API client for ``spec`` (own Configuration, own TLS pool, no disk)."""
    ssl_context = _ssl_context(spec)
    # An explicit Configuration: the library's process-wide default is never consulted.
    configuration = Configuration(host=spec.server)
    configuration.verify_ssl = not spec.insecure
    configuration.proxy = None  # no proxy from the environment; vetting refuses proxy-url
    if spec.token_provider is not None:
        provider = spec.token_provider
        configuration.api_key = {"BearerToken": provider()}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}

        def refresh(cfg: Any) -> None:
            cfg.api_key["BearerToken"] = provider()

        configuration.refresh_api_key_hook = refresh  # type: ignore[assignment]
    elif spec.token is not None:
        configuration.api_key = {"BearerToken": spec.token}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}

    client = KubeApiClient(configuration=configuration)
    client.user_agent = "certautopilot-k8s-worker"
    client.request_timeout = (connect_timeout, read_timeout)
    client.server = spec.server
    # Replace the pool the REST layer built from file paths with one using our in-memory
    # TLS context. retries=False: tenacity in KubeClient owns retrying, and urllib3 then
    # raises the underlying error instead of a MaxRetryError.
    rest = client.rest_client
    rest.pool_manager.clear()
    pool_args: dict[str, Any] = {
        "num_pools": 4,
        "maxsize": configuration.connection_pool_maxsize,
        "ssl_context": ssl_context,
        "cert_reqs": ssl.CERT_NONE if spec.insecure else ssl.CERT_REQUIRED,
        "retries": False,
        "timeout": urllib3.Timeout(connect=connect_timeout, read=read_timeout),
    }
    if spec.insecure:
        pool_args["assert_hostname"] = False
    if spec.tls_server_name:
        pool_args["server_hostname"] = spec.tls_server_name
    rest.pool_manager = urllib3.PoolManager(**pool_args)
    return client


class ClientCache:
    """The process's API clients, one per credential slot; thread-safe.

    Each slot remembers a hash of what its client was built from. A request with the same
    hash gets the cached client without decrypting or vetting anything; a different hash (a
    rotated credential) builds a new client and closes the old one.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        builder: Callable[..., KubeApiClient] = build_api_client,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._builder = builder
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, KubeApiClient]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)

    def for_sealed_credential(
        self,
        credential_id: str,
        sealed: bytes,
        *,
        allow_insecure: bool,
        reveal: Callable[[], bytes],
    ) -> KubeApiClient:
        """Return the client for a stored kubeconfig, keyed by its sealed bytes.

        ``reveal`` (the decrypt) runs only when no client was built from exactly these sealed
        bytes with this ``allow_insecure``, i.e. on first use and after a rotation.
        """
        content = hashlib.sha256(sealed).hexdigest()
        return self._get(
            f"credential:{credential_id}:{allow_insecure}",
            content,
            lambda: vet_kubeconfig(reveal(), allow_insecure=allow_insecure),
        )

    def for_kubeconfig(
        self,
        credential_id: str,
        kubeconfig: str | bytes,
        *,
        allow_insecure: bool = False,
        context: str | None = None,
    ) -> KubeApiClient:
        """Return the cached client for a kubeconfig in clear, vetted and built on first use."""
        raw = kubeconfig.encode() if isinstance(kubeconfig, str) else kubeconfig
        # Only the hash is kept; the kubeconfig text itself is never stored here.
        content = hashlib.sha256(raw + f"\0{allow_insecure}\0{context or ''}".encode()).hexdigest()
        return self._get(
            credential_id,
            content,
            lambda: vet_kubeconfig(raw, allow_insecure=allow_insecure, context=context),
        )

    def for_in_cluster(self, sa_dir: Path, environ: Mapping[str, str]) -> KubeApiClient:
        """Return the cached in-cluster client (its token is re-read as it rotates)."""
        spec = in_cluster_spec(sa_dir, environ)
        return self._get(f"in-cluster:{sa_dir}", spec.content_hash(), lambda: spec)

    def _get(
        self, key: str, content: str, make_spec: Callable[[], ConnectionSpec]
    ) -> KubeApiClient:
        with self._lock:
            cached = self._clients.get(key)
            if cached is not None and cached[0] == content:
                return cached[1]
            client = self._builder(
                make_spec(), connect_timeout=self._connect_timeout, read_timeout=self._read_timeout
            )
            self._clients[key] = (content, client)
        if cached is not None:
            # The credential changed: its old client is no longer handed out. Requests in
            # flight on it finish; closing only drops idle pooled connections.
            cached[1].close()  # type: ignore[no-untyped-call]
        return client

    def close_all(self) -> None:
        """Close every cached client (worker shutdown)."""
        with self._lock:
            clients = [client for _, client in self._clients.values()]
            self._clients.clear()
        for client in clients:
            client.close()  # type: ignore[no-untyped-call]

    def reset_after_fork(self) -> None:
        """Forget every client without closing it (the sockets belong to the parent process)."""
        self._lock = threading.Lock()
        self._clients = {}
