"""The Kubernetes module's error vocabulary: one class per cause, one place that maps.

Every failure the module reports is a :class:`KubeError` with a stable ``reason`` code (what
is stored on a target result), the ``message`` (containing the API server's own words when
it gave some), the ``fix`` an operator applies, the HTTP ``status`` (``None`` when no HTTP
answer arrived) and ``retryable`` (the very same request may succeed if simply repeated).
``str(err)`` is ``"<message> — fix: <fix>"``.

    KubeError
    ├── KubeTransportError                 no HTTP answer arrived
    │   ├── Unreachable                    unreachable              retryable
    │   ├── KubeTimeout                    timeout                  retryable
    │   ├── TlsVerificationFailed          tls_verification_failed
    │   └── WriteUnconfirmed               write_unconfirmed        a sent write, no answer
    ├── KubeApiError                       the API server answered with an error status
    │   ├── Unauthorized                   unauthorized             401
    │   ├── Forbidden                      forbidden                403
    │   ├── NotFound                       not_found                404
    │   │   └── NamespaceNotFound          namespace_not_found      404
    │   ├── Conflict                       conflict                 409
    │   │   └── AlreadyExists              already_exists           409
    │   ├── InvalidData                    invalid_data             400, 422
    │   ├── Throttled                      throttled                429 retryable
    │   ├── ServerError                    server_error             5xx retryable
    │   └── UnexpectedResponse             unexpected_response      anything else
    ├── SecretRefused                      the live Secret cannot be written as asked
    │   ├── SecretTypeConflict             secret_type_conflict     (also from a 422)
    │   ├── ImmutableSecret                immutable_secret         (also from a 422)
    │   └── UnmanagedSecret                unmanaged_secret
    ├── SecretTooLarge                     secret_too_large
    ├── RollbackRefused
    │   ├── SnapshotDrifted                snapshot_drifted
    │   └── NothingToRestore               nothing_to_restore
    ├── KubeconfigRejected                 kubeconfig_rejected
    └── InClusterUnavailable               in_cluster_unavailable

:func:`translate` is the only function that turns the client library's and the network's
exceptions into these classes; :func:`error_from_response` does the same for an HTTP error
answer. Callers raise the result ``from`` the original exception so the cause stays visible
in tracebacks. Messages pass through :func:`scrub`, so a bearer token, a private key or a
kubeconfig's base64 key data never reaches a log line even if some layer echoed it.

This module is pure: the client library and urllib3 are imported only inside
:func:`translate`, so the pure modules (``secret``) may raise these errors.
"""

from __future__ import annotations

import email.utils
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.client import HTTPException
from typing import Any, ClassVar

__all__ = [
    "AlreadyExists",
    "Conflict",
    "Forbidden",
    "ImmutableSecret",
    "InClusterUnavailable",
    "InvalidData",
    "KubeApiError",
    "KubeError",
    "KubeTimeout",
    "KubeTransportError",
    "KubeconfigRejected",
    "NamespaceNotFound",
    "NotFound",
    "NothingToRestore",
    "Operation",
    "RollbackRefused",
    "SecretRefused",
    "SecretTooLarge",
    "SecretTypeConflict",
    "ServerError",
    "SnapshotDrifted",
    "Throttled",
    "TlsVerificationFailed",
    "Unauthorized",
    "UnexpectedResponse",
    "UnmanagedSecret",
    "Unreachable",
    "WriteUnconfirmed",
    "error_from_response",
    "forbidden_fix",
    "forbidden_message",
    "request_may_have_arrived",
    "scrub",
    "translate",
]

#: Longest API message kept in an error; the rest is cut so one answer cannot flood a log.
_MAX_API_MESSAGE = 600


class KubeError(Exception):
    """Base of every error the Kubernetes module raises."""

    reason: ClassVar[str] = "kube_error"
    default_fix: ClassVar[str] = "See the message; retry once the cause is fixed."
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        fix: str | None = None,
        status: int | None = None,
        retryable: bool | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.message = scrub(message)
        self.fix = scrub(fix if fix is not None else self.default_fix)
        self.status = status
        self.retryable = self.default_retryable if retryable is None else retryable
        # Structured context for the result record (for example the diff of a refused
        # write). Never key material: callers put only SecretDiff.to_dict() output here.
        self.details: dict[str, Any] = dict(details or {})
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.message} — fix: {self.fix}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args) by default, which would lose fix/status/...;
        # rebuild from the instance dict instead (Celery may pickle exceptions).
        return (_rebuild, (type(self), dict(self.__dict__)))

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able record of this error (reason, message, fix, status, retryable)."""
        return {
            "reason": self.reason,
            "message": self.message,
            "fix": self.fix,
            "status": self.status,
            "retryable": self.retryable,
        }


def _rebuild(cls: type[KubeError], state: dict[str, Any]) -> KubeError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    Exception.__init__(err, str(err))
    return err


# --- transport ----------------------------------------------------------------------------


class KubeTransportError(KubeError):
    """No HTTP answer arrived from the API server."""

    reason = "transport_error"


class Unreachable(KubeTransportError):
    """The API server could not be connected to (refused, DNS, reset)."""

    reason = "unreachable"
    default_retryable = True
    default_fix = (
        "Check the server URL in the kubeconfig (or the in-cluster service address), that the "
        "API server is running, and that the network lets this worker reach it."
    )


class KubeTimeout(KubeTransportError):
    """Connecting to or reading from the API server took longer than the configured timeout."""

    reason = "timeout"
    default_retryable = True
    default_fix = (
        "The API server did not answer in time. Check its load and the network; raise "
        "CAP_KUBE_CONNECT_TIMEOUT / CAP_KUBE_READ_TIMEOUT if it is merely slow."
    )


class TlsVerificationFailed(KubeTransportError):
    """The API server's certificate did not verify against the configured CA or name."""

    reason = "tls_verification_failed"
    default_fix = (
        "Put the cluster's CA in the kubeconfig's certificate-authority-data (or fix "
        "tls-server-name / the server host so it matches the serving certificate). Do not "
        "disable verification."
    )


class WriteUnconfirmed(KubeTransportError):
    """A write was sent, but the connection failed before its answer: it may have landed.

    Reported instead of :class:`Unreachable`/:class:`KubeTimeout` for a create or replace
    when any attempt failed after the request could have reached the server (a read timeout,
    a connection cut mid-request) and no later attempt settled it. Claiming "failed, nothing
    changed" then would be a lie half of the time; the next run reads the Secret back and
    reports ``unchanged`` if the write did land.
    """

    reason = "write_unconfirmed"
    default_fix = (
        "The Secret may already hold the new certificate. Run the distribution again once the "
        "API server answers: it reads the Secret back, reports `unchanged` if this write "
        "landed, and writes it otherwise."
    )


def request_may_have_arrived(exc: BaseException | None) -> bool:
    """Whether a request that failed with ``exc`` (a library or network exception) may have
    reached the server. Only failures before sending (DNS, refused or timed-out connect, a
    certificate that does not verify) say it did not; anything else, a timeout waiting for
    the answer or a connection cut mid-request, may have delivered it."""
    import urllib3.exceptions as u3

    while isinstance(exc, u3.MaxRetryError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if exc is None:
        return True
    if isinstance(exc, u3.NameResolutionError | u3.NewConnectionError | u3.ConnectTimeoutError):
        return False
    if isinstance(exc, ConnectionRefusedError | ssl.CertificateError):
        return False
    # urllib3's SSLError and the client's ApiException(status=0) carry the reason as text.
    return not _is_verification_failure(_text(exc))


# --- API answers --------------------------------------------------------------------------


class KubeApiError(KubeError):
    """The API server answered with an error status."""

    reason = "api_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        #: Seconds the server asked us to wait before repeating (its Retry-After header, or
        #: the Status object's retryAfterSeconds); honoured by the client's backoff.
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class Unauthorized(KubeApiError):
    """401: the credential was not accepted (expired, revoked or invalid)."""

    reason = "unauthorized"
    default_fix = (
        "The credential's token or client certificate is expired, revoked or invalid. Store a "
        "fresh kubeconfig in the module credential; in-cluster, check the mounted "
        "ServiceAccount token."
    )


class Forbidden(KubeApiError):
    """403: RBAC (or an admission rule) refused the request."""

    reason = "forbidden"
    default_fix = "The credential's identity lacks a permission. Fix the RoleBinding."

    def __init__(
        self,
        message: str,
        *,
        verb: str | None = None,
        resource: str | None = None,
        namespace: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.verb = verb
        self.resource = resource
        self.namespace = namespace
        super().__init__(message, **kwargs)


class NotFound(KubeApiError):
    """404: the object does not exist."""

    reason = "not_found"
    default_fix = "Check the namespace and name; the object does not exist."


class NamespaceNotFound(NotFound):
    """404 for the namespace itself: the module never creates namespaces."""

    reason = "namespace_not_found"
    default_fix = "The module does not create namespaces. Create the namespace first, then retry."

    def __init__(self, message: str, *, namespace: str | None = None, **kwargs: Any) -> None:
        self.namespace = namespace
        super().__init__(message, **kwargs)


class Conflict(KubeApiError):
    """409: the object changed since it was read (stale resourceVersion)."""

    reason = "conflict"
    default_fix = (
        "Another writer changed the Secret between our read and our write. Retry; if it keeps "
        "happening, find the controller that also writes this Secret."
    )


class AlreadyExists(Conflict):
    """409 on create: the object appeared since it was read."""

    reason = "already_exists"
    default_fix = "The Secret was created by someone else meanwhile; retry to update it instead."


class InvalidData(KubeApiError):
    """400/422: the API server rejected the object's content."""

    reason = "invalid_data"
    default_fix = (
        "The API server rejected the Secret's content; its message names the field. Check the "
        "certificate and key stored for this distribution and the target's Secret name."
    )


class Throttled(KubeApiError):
    """429: the API server asked us to slow down (Retry-After honoured)."""

    reason = "throttled"
    default_retryable = True
    default_fix = (
        "The API server is rate-limiting this client (API priority and fairness). The request is "
        "retried after the delay it asks for; reduce the batch size if it persists."
    )


class ServerError(KubeApiError):
    """5xx: the API server (or etcd behind it) failed (a 503's Retry-After is honoured)."""

    reason = "server_error"
    default_retryable = True
    default_fix = (
        "The API server failed internally; it is retried. Check the control plane's health."
    )


class UnexpectedResponse(KubeApiError):
    """An answer this module does not understand (odd status, unparseable body)."""

    reason = "unexpected_response"
    default_fix = (
        "The server's answer was not what a Kubernetes API server sends. Check that the server "
        "URL points at the API server and not at a proxy or another service."
    )


# --- refusals about the live Secret ---------------------------------------------------------


class SecretRefused(KubeError):
    """The live Secret exists in a state this module must not overwrite."""

    reason = "secret_refused"


class SecretTypeConflict(SecretRefused):
    """The live Secret has another type (type is immutable)."""

    reason = "secret_type_conflict"
    default_fix = (
        "A Secret's type cannot be changed. Delete the existing Secret (kubectl delete secret) "
        "or choose another Secret name for this target."
    )


class ImmutableSecret(SecretRefused):
    """The live Secret is marked immutable: true."""

    reason = "immutable_secret"
    default_fix = (
        "The Secret is marked immutable: true and can never be updated. Delete it so it can be "
        "recreated, or choose another Secret name for this target."
    )


class UnmanagedSecret(SecretRefused):
    """The live Secret was not created by CertAutoPilot and the target does not adopt."""

    reason = "unmanaged_secret"
    default_fix = (
        "The Secret exists but is not managed by CertAutoPilot (no app.kubernetes.io/managed-by="
        "certautopilot label). Choose another Secret name, or enable 'adopt unmanaged' on the "
        "target to take it over (turn on 'Store content' first to keep its previous content)."
    )


class SecretTooLarge(KubeError):
    """The desired Secret exceeds the API's 1 MiB limit."""

    reason = "secret_too_large"
    default_fix = (
        "Kubernetes limits a Secret's data to 1 MiB. Trim the chain (leave ca.crt off, drop "
        "unneeded intermediates) or check that the right certificate was stored."
    )


# --- rollback -----------------------------------------------------------------------------


class RollbackRefused(KubeError):
    """A rollback cannot be applied."""

    reason = "rollback_refused"


class SnapshotDrifted(RollbackRefused):
    """The live Secret no longer holds what CertAutoPilot wrote."""

    reason = "snapshot_drifted"
    default_fix = (
        "Someone changed the Secret after CertAutoPilot wrote it; restoring the snapshot would "
        "overwrite their change. Check the Secret, then roll back with force if it is still "
        "wanted."
    )


class NothingToRestore(RollbackRefused):
    """The Secret did not exist before the first write, so there is nothing to put back."""

    reason = "nothing_to_restore"
    default_fix = (
        "The Secret did not exist before CertAutoPilot's first write; the module has no delete "
        "permission — delete it by hand if needed (kubectl delete secret)."
    )


# --- connection setup ----------------------------------------------------------------------


class KubeconfigRejected(KubeError):
    """The kubeconfig is malformed or asks for something the module refuses to do."""

    reason = "kubeconfig_rejected"
    default_fix = (
        "Store a kubeconfig with inline data only (certificate-authority-data, "
        "client-certificate-data / client-key-data or token), e.g. `kubectl config view "
        "--minify --flatten --raw`, or a ServiceAccount token kubeconfig."
    )

    def __init__(self, message: str, *, field: str | None = None, **kwargs: Any) -> None:
        self.field = field
        super().__init__(message, **kwargs)


class InClusterUnavailable(KubeError):
    """In-cluster mode was asked for, but this process does not run in a Kubernetes pod."""

    reason = "in_cluster_unavailable"
    default_fix = (
        "In-cluster mode works only when the worker runs inside Kubernetes with a mounted "
        "ServiceAccount token (the Helm chart does this). Elsewhere use kubeconfig mode with a "
        "credential for this cluster, or point CAP_SERVICEACCOUNT_DIR at the token folder."
    )


# --- scrubbing ----------------------------------------------------------------------------

_SCRUBBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
            re.DOTALL,
        ),
        "[redacted private key]",
    ),
    # base64 of "-----BEGIN" (kubeconfig *-data fields); certificates are harmless but a
    # key looks the same from here, so every such blob goes.
    (re.compile(r"LS0tLS1CRUdJT[A-Za-z0-9+/=]{8,}"), "[redacted data]"),
    (
        re.compile(r"(?i)\b(authorization\s*[:=]\s*)(?:(?:bearer|basic)\s+)?[^\s,;'\"}]+"),
        r"\1[redacted]",
    ),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-_.~+/]+=*"), "Bearer [redacted]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted token]"),
    (
        re.compile(r"(?i)\b((?:token|password|client-key-data)\"?\s*[:=]\s*\"?)[^\s,;'\"}]+"),
        r"\1[redacted]",
    ),
)


def scrub(text: str) -> str:
    """Remove anything that looks like a credential (key, bearer token, JWT) from ``text``."""
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return text


# --- mapping ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """What was being attempted when an error happened (used to word the message)."""

    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None
    server: str | None = None

    def target(self) -> str:
        """Return e.g. ``secrets "web-tls" in namespace "ingress"`` for messages."""
        text = self.resource
        if self.name:
            text += f' "{self.name}"'
        if self.namespace and self.resource != "namespaces":
            text += f' in namespace "{self.namespace}"'
        return text


_PARTICIPLES = {
    "get": "read",
    "list": "listed",
    "watch": "watched",
    "create": "created",
    "update": "updated",
    "patch": "patched",
    "delete": "deleted",
    "deletecollection": "deleted",
}

_RBAC_DENIAL = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>[\w-]+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "[^"]*")?(?: in the namespace "(?P<namespace>[^"]+)")?'
)


def forbidden_message(verb: str, resource: str, namespace: str | None) -> str:
    """Return the spec's wording, e.g. ``forbidden: secrets cannot be updated``."""
    participle = _PARTICIPLES.get(verb, f"{verb}-ed")
    where = f' in namespace "{namespace}"' if namespace and resource != "namespaces" else ""
    return f"forbidden: {resource} cannot be {participle}{where}"


def forbidden_fix(verb: str, resource: str, user: str | None = None) -> str:
    """Return the spec's fix, e.g. ``ServiceAccount lacks update verb in the target ...``."""
    if user is None or user.startswith("system:serviceaccount:"):
        who = "ServiceAccount"
    else:
        who = f'The credential\'s identity (User "{user}")'
    on = "" if resource == "secrets" else f" on {resource}"
    return f"{who} lacks {verb} verb{on} in the target namespace. Fix the RoleBinding."


def _api_status(body: bytes | str | None) -> dict[str, Any]:
    if not body:
        return {}
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_API_MESSAGE else text[: _MAX_API_MESSAGE - 1] + "…"


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == name.lower():
            return str(value)
    return None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Return the delay a Retry-After header asks for, in seconds (delta or HTTP date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def error_from_response(
    status: int,
    body: bytes | str | None,
    headers: Mapping[str, str] | None = None,
    op: Operation | None = None,
) -> KubeError:
    """Return the error for an HTTP error answer (status, Status-object body, headers)."""
    parsed = _api_status(body)
    api_message = _short(str(parsed.get("message") or ""))
    api_reason = str(parsed.get("reason") or "")
    raw_details = parsed.get("details")
    details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    causes = [c for c in details.get("causes") or [] if isinstance(c, dict)]
    what = op.target() if op else "the request"
    said = f" (API server: {api_message})" if api_message else ""

    if status == 401:
        server = f" by {op.server}" if op and op.server else ""
        return Unauthorized(
            f"unauthorized: the credential was rejected{server}{said}", status=status
        )
    if status == 403:
        return _forbidden(api_message, op, status)
    if status == 404:
        kind = str(details.get("kind") or "")
        if kind == "namespaces" or (op is not None and op.resource == "namespaces"):
            namespace = str(details.get("name") or (op.name if op else "") or "")
            message = f'namespaces "{namespace}" not found'  # the spec's wording, verbatim
            if api_message and api_message != message:
                message += said
            return NamespaceNotFound(message, namespace=namespace, status=status)
        return NotFound(f"not found: {what}{said}", status=status)
    if status == 409:
        if api_reason == "AlreadyExists":
            return AlreadyExists(f"already exists: {what}{said}", status=status)
        return Conflict(f"conflict: {what} was modified since it was read{said}", status=status)
    if status in (400, 422):
        return _invalid(api_message, causes, what, status)
    if status == 413:
        return SecretTooLarge(f"too large: the API server refused {what}{said}", status=status)
    # 429 and 503 carry Retry-After (RFC 9110 §10.2.3); the API server also puts the delay
    # in the Status object. Any 5xx that sends one gets it honoured.
    retry_after = parse_retry_after(_header(headers, "Retry-After"))
    if retry_after is None and isinstance(details.get("retryAfterSeconds"), int):
        retry_after = float(details["retryAfterSeconds"])
    if status == 429:
        return Throttled(
            f"throttled: too many requests for {what}{said}", retry_after=retry_after, status=status
        )
    if status == 504 or api_reason == "Timeout":
        return ServerError(
            f"server timeout ({status}) on {what}{said}", retry_after=retry_after, status=status
        )
    if 500 <= status <= 599:
        return ServerError(
            f"server error ({status}) on {what}{said}", retry_after=retry_after, status=status
        )
    return UnexpectedResponse(f"unexpected HTTP {status} on {what}{said}", status=status)


def _forbidden(api_message: str, op: Operation | None, status: int) -> Forbidden:
    said = f" (API server: {api_message})" if api_message else ""
    match = _RBAC_DENIAL.search(api_message)
    if match is not None:
        verb, resource, user = match["verb"], match["resource"], match["user"]
        namespace = match["namespace"] or (op.namespace if op else None)
    elif op is not None and not api_message:
        # No explanation at all: RBAC refused what we attempted.
        verb, resource, namespace, user = op.verb, op.resource, op.namespace, None
    else:
        # Not an RBAC denial (the namespace is terminating, an admission rule...): the API's
        # explanation is the message, and the RoleBinding is not the fix.
        return Forbidden(
            f"forbidden: {op.target() if op else 'the request'} was refused{said}",
            verb=op.verb if op else None,
            resource=op.resource if op else None,
            namespace=op.namespace if op else None,
            status=status,
            fix="The API server refused the request for the reason it states; fix that, retry.",
        )
    return Forbidden(
        forbidden_message(verb, resource, namespace) + said,
        verb=verb,
        resource=resource,
        namespace=namespace,
        status=status,
        fix=forbidden_fix(verb, resource, user),
    )


def _invalid(api_message: str, causes: list[dict[str, Any]], what: str, status: int) -> KubeError:
    said = f" (API server: {api_message})" if api_message else ""
    fields = {str(c.get("field") or "") for c in causes}
    lowered = api_message.lower()
    if "type" in fields and "immutable" in lowered:
        return SecretTypeConflict(f"type conflict: {what} has another type{said}", status=status)
    if "immutable" in lowered:
        return ImmutableSecret(f"immutable: {what} is marked immutable{said}", status=status)
    return InvalidData(f"invalid: the API server rejected {what}{said}", status=status)


def translate(exc: BaseException, op: Operation | None = None) -> KubeError:
    """Map a client-library or network exception to a :class:`KubeError` (raise it from exc)."""
    # Imported here so that this module (and the pure modules raising its errors) can be
    # imported without the client library.
    import urllib3.exceptions as u3
    from kubernetes.client import exceptions as kexc

    if isinstance(exc, KubeError):
        return exc
    server = op.server if op and op.server else "the API server"
    what = op.target() if op else "the request"

    if isinstance(exc, kexc.ApiException):
        status = int(getattr(exc, "status", 0) or 0)
        if status == 0:
            # The REST layer wraps urllib3's SSLError as ApiException(status=0, reason=...).
            text = str(getattr(exc, "reason", "") or "")
            if "SSL" in text or "certificate" in text.lower():
                return _tls_error(text, server)
            return Unreachable(f"no answer from {server} for {what}: {_short(text)}")
        raw_headers = getattr(exc, "headers", None)
        headers = dict(raw_headers) if raw_headers else None
        return error_from_response(status, getattr(exc, "body", None), headers, op)
    if isinstance(exc, kexc.OpenApiException):
        # ApiTypeError / ApiValueError / ApiKeyError: the request could not even be built.
        return UnexpectedResponse(
            f"the Kubernetes client refused to build the request for {what}: {_text(exc)}",
            fix="This is a defect in CertAutoPilot; report it with the message.",
        )
    cause = getattr(exc, "reason", None)
    if isinstance(exc, u3.MaxRetryError) and isinstance(cause, BaseException):
        return translate(cause, op)
    if isinstance(exc, u3.SSLError | ssl.SSLError | ssl.CertificateError):
        return _tls_error(_text(exc), server)
    if isinstance(exc, u3.NameResolutionError):
        return Unreachable(f"cannot resolve the host of {server}: {_text(exc)}")
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2, so it goes first.
    if isinstance(exc, u3.NewConnectionError):
        return Unreachable(f"cannot connect to {server}: {_short(_errno_text(exc))}")
    if isinstance(exc, u3.ConnectTimeoutError):
        return KubeTimeout(f"connecting to {server} timed out ({what})")
    if isinstance(exc, u3.ReadTimeoutError | u3.TimeoutError | TimeoutError):
        return KubeTimeout(f"{server} did not answer in time ({what})")
    if isinstance(exc, u3.ProtocolError | u3.ProxyError | ConnectionError | HTTPException):
        return Unreachable(f"the connection to {server} broke ({what}): {_text(exc)}")
    if isinstance(exc, u3.HTTPError | OSError | ValueError):
        return Unreachable(
            f"transport failure talking to {server} ({what}): {type(exc).__name__}: {_text(exc)}"
        )
    return KubeError(f"unexpected failure on {what}: {type(exc).__name__}: {_text(exc)}")


def _text(exc: BaseException) -> str:
    try:
        return _short(str(exc))
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the original failure
        return type(exc).__name__


def _errno_text(exc: BaseException) -> str:
    # "Failed to establish a new connection: [Errno 111] Connection refused" is the useful part.
    text = _text(exc)
    marker = "Failed to establish a new connection:"
    return text[text.index(marker) :] if marker in text else text


def _tls_error(text: str, server: str) -> KubeError:
    if _is_verification_failure(text):
        return TlsVerificationFailed(
            f"TLS verification of {server} failed: {_short(_tls_reason(text))}"
        )
    # Handshake interrupted (EOF, reset): a network problem rather than a trust problem.
    return Unreachable(f"the TLS handshake with {server} failed: {_short(_tls_reason(text))}")


def _is_verification_failure(text: str) -> bool:
    lowered = text.lower()
    return (
        "certificate verify failed" in lowered
        or "certificate_verify_failed" in lowered
        or "hostname" in lowered
        or "doesn't match" in lowered
        or "certificateerror" in lowered
    )


def _tls_reason(text: str) -> str:
    # "SSLError\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)"
    text = re.sub(r"\(_ssl\.c:\d+\)", "", text.replace("SSLError\n", " "))
    text = re.sub(r"\[SSL: [A-Z_]+\]", "", text)
    return " ".join(text.split()).strip(" ()'\",") or "(no detail given)"
