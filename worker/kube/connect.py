"""Connecting to a cluster: vet a kubeconfig, detect in-cluster mode, build and cache API clients.

Three rules shape this module (DESIGN.md decisions 6 and 7):

* A stored kubeconfig may neither run programs nor read local files. ``exec``,
  ``auth-provider`` and path fields are refused, as in Flux's fix for CVE-2022-24817;
  anything the module does not understand is refused too rather than silently ignored.
  Storing (:func:`minimal_kubeconfig`) applies these rules to every entry of the file and
  *refuses* a file with a refused field even in an unused entry, naming it
  (``users[gke].user.exec``), rather than stripping it: such a file is not one to keep, the
  operator learns what it held, and ``kubectl config view --minify --flatten --raw`` makes
  an acceptable one. What is sealed is re-serialised from the vetted connection: the
  selected context with its one cluster and one user, inline data only. Connecting
  (:func:`vet_kubeconfig`) vets the selected entries, what it uses. Text is measured
  (``worker.core.limits``) before it is parsed, and parsed by a YAML loader that refuses
  anchors, aliases, tags, merge keys and duplicate keys, with bounded depth and size.
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

from worker.core.limits import KUBECONFIG, YAML_MAX_DEPTH, YAML_MAX_NODES, check_size
from worker.kube.errors import InClusterUnavailable, KubeconfigRejected

__all__ = [
    "ClientCache",
    "ConnectionSpec",
    "KubeApiClient",
    "RotatingTokenFile",
    "build_api_client",
    "in_cluster_available",
    "in_cluster_spec",
    "minimal_kubeconfig",
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


def _reject(message: str, field_path: str, *, fix: str | None = None) -> KubeconfigRejected:
    return KubeconfigRejected(
        f"kubeconfig rejected: {field_path} {message}", field=field_path, fix=fix
    )


# --- parsing ------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class _KubeconfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing what a kubeconfig never needs.

    kubectl writes none of these, and each is a way to make a small file expensive or
    ambiguous: anchors and aliases (the "billion laughs" shape), tags (``!!binary``,
    ``!!python/...``), merge keys (``<<``) and duplicate keys (two readers may keep
    different values). Nesting depth and node count are bounded (``worker.core.limits``).
    Timestamps stay text: kubeconfig fields are never dates, and an impossible date such
    as ``2024-13-45`` must not fail outside the YAML error path.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise _yaml_refusal(f"uses an alias (*{_short(event.anchor)})", line)
        if getattr(event, "anchor", None) is not None:
            raise _yaml_refusal(f"defines an anchor (&{_short(event.anchor)})", line)
        if getattr(event, "tag", None) is not None:
            raise _yaml_refusal(f"uses the tag {_short(event.tag)}", line)
        self._nodes += 1
        if self._nodes > YAML_MAX_NODES:
            raise _yaml_refusal(f"has more than {YAML_MAX_NODES} YAML nodes", line)
        self._depth += 1
        if self._depth > YAML_MAX_DEPTH:
            raise _yaml_refusal(f"nests deeper than {YAML_MAX_DEPTH} levels", line)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                raise _yaml_refusal("uses a merge key (<<)", key_node.start_mark.line + 1)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        if len(mapping) < len(node.value):
            seen: set[Any] = set()  # the keys are hashable: the mapping was built from them
            for key_node, _ in node.value:
                key = self.construct_object(key_node)  # cached: the same object as above
                if key in seen:
                    raise _yaml_refusal(
                        f"repeats the key {_short(repr(key))}", key_node.start_mark.line + 1
                    )
                seen.add(key)
        return mapping


def _short(text: str | None, limit: int = 40) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _yaml_refusal(problem: str, line: int) -> KubeconfigRejected:
    return KubeconfigRejected(
        f"kubeconfig rejected: line {line} {problem}; kubeconfigs are plain YAML mappings "
        "and lists (no anchors, aliases, tags, merge keys or repeated keys)",
        field=f"(line {line})",
    )


def _load(text: str | bytes) -> dict[str, Any]:
    """Size-check, then parse a kubeconfig with the hardened loader; return its mapping."""
    check_size(KUBECONFIG, text, "the kubeconfig")
    loader: _KubeconfigLoader | None = None
    try:
        loader = _KubeconfigLoader(text)  # the reader decodes (and may refuse) the first bytes
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # The YAML error could quote a line holding key data; keep only its position.
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise KubeconfigRejected(
            f"kubeconfig rejected: the text is not valid YAML{where}", field="(document)"
        ) from None
    except (yaml.YAMLError, ValueError, OverflowError):
        # ReaderError (not UTF-8, control characters) or a value PyYAML cannot convert.
        raise KubeconfigRejected(
            "kubeconfig rejected: the text is not valid YAML (not UTF-8 text, or a value "
            "cannot be read)",
            field="(document)",
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(doc, dict):
        raise KubeconfigRejected(
            "kubeconfig rejected: the text is not a kubeconfig (expected a YAML mapping with "
            "clusters, users, contexts and current-context)",
            field="(document)",
        )
    return doc


# --- vetting ------------------------------------------------------------------------------

_TOP_LEVEL_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "preferences",
        "clusters",
        "users",
        "contexts",
        "current-context",
        "extensions",
    }
)
_CONTEXT_FIELDS = frozenset({"cluster", "user", "namespace", "extensions"})
_SECTIONS: tuple[tuple[str, str, Mapping[str, str], frozenset[str]], ...] = (
    ("clusters", "cluster", _CLUSTER_FIELDS_REFUSED, _CLUSTER_FIELDS_ALLOWED),
    ("users", "user", _USER_FIELDS_REFUSED, _USER_FIELDS_ALLOWED),
    ("contexts", "context", {}, _CONTEXT_FIELDS),
)
_INSECURE_FIX = (
    "To connect without verifying the API server's certificate, allow it on the target "
    "(`certautopilot targets add ... --allow-insecure`); better, replace "
    "insecure-skip-tls-verify with the cluster's CA in certificate-authority-data and add the "
    "credential again."
)
_ONE_CONTEXT_FIX = (
    "Export only the context this credential is for, with inline data: "
    "`kubectl config view --minify --flatten --raw --context <name>`."
)


def _vet_fields(
    body: Mapping[Any, Any],
    path: str,
    refused: Mapping[str, str],
    allowed: frozenset[str],
    fix: str | None = None,
) -> None:
    for key in body:
        if key in refused:
            raise _reject(refused[key], f"{path}.{key}", fix=fix)
        if key not in allowed:
            raise _reject("is not supported by CertAutoPilot", f"{path}.{key}", fix=fix)


def _vet_every_entry(doc: Mapping[str, Any]) -> None:
    """Apply the field rules to every entry of the file, selected by the context or not."""
    for key in doc:
        if key not in _TOP_LEVEL_FIELDS:
            raise _reject("is not a kubeconfig field", str(key))
    for section, inner, refused, allowed in _SECTIONS:
        entries = doc.get(section)
        if entries is None:
            continue  # a missing section is reported when the context is resolved
        if not isinstance(entries, list):
            raise _reject("must be a list", section)
        names: set[str] = set()
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise _reject("is not a mapping", f"{section}[#{index}]")
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise _reject("is missing or not text", f"{section}[#{index}].name")
            where = f"{section}[{name}]"
            if name in names:
                raise _reject("appears twice; entry names must be unique", where)
            names.add(name)
            for key in entry:
                if key not in ("name", inner):
                    raise _reject("is not supported by CertAutoPilot", f"{where}.{key}")
            body = entry.get(inner)
            if not isinstance(body, dict):
                raise _reject("is missing or not a mapping", f"{where}.{inner}")
            _vet_fields(body, f"{where}.{inner}", refused, allowed, fix=_ONE_CONTEXT_FIX)


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


@dataclass(frozen=True)
class _Selected:
    """The context a kubeconfig credential uses, with its cluster and user entries."""

    context: str
    cluster_name: str
    user_name: str
    cluster: Mapping[Any, Any]
    user: Mapping[Any, Any]


def _select(doc: Mapping[str, Any], context: str | None) -> _Selected:
    context_name = context if context is not None else doc.get("current-context")
    if not context_name:
        raise _reject("is empty; name the context to use", "current-context")
    if not isinstance(context_name, str):
        raise _reject("must be the name of a context", "current-context")
    ctx = _named_entry(doc.get("contexts"), context_name, "contexts", "context")
    _vet_fields(ctx, f"contexts[{context_name}].context", {}, _CONTEXT_FIELDS)
    names: dict[str, str] = {}
    for key in ("cluster", "user"):
        value = ctx.get(key)
        if not value:
            raise _reject("is missing", f"contexts[{context_name}].context.{key}")
        if not isinstance(value, str):
            raise _reject("must be a name", f"contexts[{context_name}].context.{key}")
        names[key] = value
    return _Selected(
        context=context_name,
        cluster_name=names["cluster"],
        user_name=names["user"],
        cluster=_named_entry(doc.get("clusters"), names["cluster"], "clusters", "cluster"),
        user=_named_entry(doc.get("users"), names["user"], "users", "user"),
    )


def _inline_data(body: Mapping[Any, Any], key: str, path: str, marker: str) -> bytes | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _reject("is not base64 text", path)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _reject("is not valid base64", path) from None
    if marker.encode() not in data:
        raise _reject(f"does not hold PEM data ({marker} ... block expected)", path)
    return data


def _has_space_or_control(text: str) -> bool:
    return any(char.isspace() or not char.isprintable() for char in text)


def _server(cluster: Mapping[Any, Any], path: str) -> str:
    server = cluster.get("server")
    if not server:
        raise _reject("is missing", path)
    if not isinstance(server, str) or _has_space_or_control(server):
        raise _reject("must be an https:// URL without spaces or control characters", path)
    try:
        parts = urlsplit(server)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number 0-65535
    except ValueError:
        raise _reject(f'is not a valid URL (got "{_short(server, 200)}")', path) from None
    if parts.scheme != "https" or not parts.hostname:
        raise _reject(
            f'must be an https:// URL with a host (got "{_short(server, 200)}"); plain http '
            "is refused",
            path,
        )
    return server.rstrip("/")


def _connection(selected: _Selected, allow_insecure: bool) -> ConnectionSpec:
    """The connection of the selected context, refusing every field rule it breaks."""
    cluster, user = selected.cluster, selected.user
    cluster_path = f"clusters[{selected.cluster_name}].cluster"
    user_path = f"users[{selected.user_name}].user"
    _vet_fields(cluster, cluster_path, _CLUSTER_FIELDS_REFUSED, _CLUSTER_FIELDS_ALLOWED)
    _vet_fields(user, user_path, _USER_FIELDS_REFUSED, _USER_FIELDS_ALLOWED)

    server = _server(cluster, f"{cluster_path}.server")
    insecure = cluster.get("insecure-skip-tls-verify") is True
    if insecure and not allow_insecure:
        raise _reject(
            "disables TLS verification, and this target does not allow insecure connections",
            f"{cluster_path}.insecure-skip-tls-verify",
            fix=_INSECURE_FIX,
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
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise _reject("is empty or not a string", f"{user_path}.token")
        token = token.strip()
        if _has_space_or_control(token):
            # It becomes an HTTP header value: a line break there would split the header.
            raise _reject("contains spaces or control characters", f"{user_path}.token")
    if cert_pem is None and token is None:
        raise _reject(
            "has no credentials (needs token, or client-certificate-data with client-key-data)",
            user_path,
        )
    tls_server_name = cluster.get("tls-server-name")
    if tls_server_name and (
        not isinstance(tls_server_name, str) or _has_space_or_control(tls_server_name)
    ):
        raise _reject("must be a host name", f"{cluster_path}.tls-server-name")
    return ConnectionSpec(
        server=server,
        ca_pem=ca_pem,
        client_cert_pem=cert_pem,
        client_key_pem=key_pem,
        token=token,
        tls_server_name=tls_server_name or None,
        insecure=insecure,
    )


def vet_kubeconfig(
    text: str | bytes, *, allow_insecure: bool = False, context: str | None = None
) -> ConnectionSpec:
    """Parse a kubeconfig in memory and return the connection of its context, refusing anything
    unsafe in that context's cluster and user (what a connection uses).

    Connecting vets only the selected entries, so a credential stored before stored
    credentials were minimal keeps working; :func:`minimal_kubeconfig` vets the whole file.
    """
    return _connection(_select(_load(text), context), allow_insecure)


class _MinimalDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # never write anchors: the loader refuses them


def minimal_kubeconfig(text: str | bytes, *, context: str | None = None) -> bytes:
    """Vet a whole kubeconfig and return what a credential stores: its selected context only.

    Every entry of the file, selected or not, must pass the field rules (no ``exec``,
    ``auth-provider``, file paths, impersonation, proxy or basic auth anywhere): a refused
    field in an unused entry is refused too, naming the entry, rather than stripped
    silently. The result is re-serialised from the vetted connection: one context, one
    cluster, one user, inline data only, no extensions, preferences or namespace. It passes
    :func:`vet_kubeconfig` with the same connection and is a fixed point of this function.
    Insecure clusters are accepted here: the target decides (``allow_insecure``).
    """
    doc = _load(text)
    _vet_every_entry(doc)
    selected = _select(doc, context)
    spec = _connection(selected, allow_insecure=True)
    cluster: dict[str, Any] = {"server": spec.server}
    if spec.ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(spec.ca_pem).decode()
    if spec.tls_server_name:
        cluster["tls-server-name"] = spec.tls_server_name
    if spec.insecure:
        cluster["insecure-skip-tls-verify"] = True
    user: dict[str, Any] = {}
    if spec.client_cert_pem is not None and spec.client_key_pem is not None:
        user["client-certificate-data"] = base64.b64encode(spec.client_cert_pem).decode()
        user["client-key-data"] = base64.b64encode(spec.client_key_pem).decode()
    if spec.token is not None:
        user["token"] = spec.token
    minimal = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": selected.context,
        "contexts": [
            {
                "name": selected.context,
                "context": {"cluster": selected.cluster_name, "user": selected.user_name},
            }
        ],
        "clusters": [{"name": selected.cluster_name, "cluster": cluster}],
        "users": [{"name": selected.user_name, "user": user}],
    }
    dumped: str = yaml.dump(
        minimal, Dumper=_MinimalDumper, sort_keys=False, allow_unicode=True, width=2**20
    )
    return dumped.encode()


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
