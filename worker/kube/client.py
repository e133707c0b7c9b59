"""The only module that calls the Kubernetes API.

A :class:`KubeClient` wraps one ``kubernetes.client.ApiClient`` (built by
:mod:`worker.kube.connect`) and offers the handful of calls the module needs. Responses are
read raw and parsed as JSON here (no model deserialisation: it is slow and we hand dicts to
the pure code anyway). Every failure leaves as a :class:`~worker.kube.errors.KubeError`:
library and network exceptions go through :func:`~worker.kube.errors.translate`, HTTP error
answers through :func:`~worker.kube.errors.error_from_response`.

Transient failures (429 and 5xx honouring Retry-After, timeouts, connection errors) are retried
with exponential backoff and jitter, bounded by attempts and by total time. Permanent ones
(400/401/403/404/409/422) are not: a 409 is the caller's cue to re-read and decide again.
Retrying a write is safe because every update carries the resourceVersion that was read
(a repeated PUT that already landed answers 409) and a repeated create answers 409 too.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, TypeVar

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import OpenApiException
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from worker.kube.errors import (
    KubeApiError,
    KubeError,
    KubeTimeout,
    KubeTransportError,
    Operation,
    UnexpectedResponse,
    WriteUnconfirmed,
    error_from_response,
    request_may_have_arrived,
    translate,
)

if TYPE_CHECKING:
    from worker.platform.settings import KubeSettings

__all__ = ["FIELD_MANAGER", "AccessReview", "KubeClient", "RetryPolicy", "retry_status_class"]

#: Recorded in managedFields so `kubectl get -o yaml --show-managed-fields` names us.
FIELD_MANAGER = "certautopilot"

#: Objects per page of a list (pods, ingresses): bounds one answer's size in a big namespace.
LIST_PAGE_SIZE = 500

#: Used when the ApiClient was not built by connect.build_api_client (tests' admin client).
DEFAULT_TIMEOUT = (5.0, 15.0)

# What the REST layer and the network can raise; everything else is a defect and propagates.
# ValueError covers urllib3's URL/proxy errors (LocationValueError, ProxySchemeUnsupported).
_LIBRARY_ERRORS = (
    OpenApiException,
    urllib3.exceptions.HTTPError,
    HTTPException,
    OSError,
    ValueError,
)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient API failures are retried (bounded by attempts and total seconds)."""

    attempts: int = 5
    max_seconds: float = 30.0
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    jitter: float = 0.5
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    on_retry: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    """Told the status class (:func:`retry_status_class`) of each retried failure (metrics)."""

    @classmethod
    def from_settings(
        cls, kube: KubeSettings, on_retry: Callable[[str], None] | None = None
    ) -> RetryPolicy:
        """Return the policy configured by CAP_KUBE_RETRY_ATTEMPTS / CAP_KUBE_RETRY_MAX_SECONDS."""
        return cls(
            attempts=kube.retry_attempts, max_seconds=kube.retry_max_seconds, on_retry=on_retry
        )


def retry_status_class(exc: BaseException | None) -> str:
    """A retried failure's class for metrics: ``429``, ``5xx``, ``timeout`` or ``connection``."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return "429" if status == 429 else f"{status // 100}xx"
    return "timeout" if isinstance(exc, KubeTimeout) else "connection"


@dataclass(frozen=True)
class AccessReview:
    """The answer of a SelfSubjectAccessReview."""

    allowed: bool
    reason: str


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, KubeError) and exc.retryable


class _Wait:
    """Exponential backoff with jitter, but never shorter than the server's Retry-After."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._backoff = wait_exponential_jitter(
            multiplier=policy.initial_backoff, max=policy.max_backoff, jitter=policy.jitter
        )

    def __call__(self, state: RetryCallState) -> float:
        delay = float(self._backoff(state))
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, KubeApiError) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return delay


class KubeClient:
    """Secrets, namespaces and access reviews over one API client, with retries and counting."""

    def __init__(
        self,
        api_client: ApiClient,
        *,
        retry: RetryPolicy,
        timeout: tuple[float, float] | None = None,
    ) -> None:
        self._api = api_client
        self._retry = retry
        self._timeout = timeout or getattr(api_client, "request_timeout", None) or DEFAULT_TIMEOUT
        self.server: str = getattr(api_client, "server", None) or api_client.configuration.host
        self._lock = threading.Lock()
        #: HTTP requests sent (every attempt counts), for results and benchmarks.
        self.requests_made = 0
        #: Of those, how many were retries of a transient failure.
        self.retries_made = 0

    # --- public calls ---------------------------------------------------------------------

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Return the live Secret, or None when it does not exist."""
        op = Operation("get", "secrets", namespace, name, self.server)
        return self._call(
            "GET",
            "/api/v1/namespaces/{namespace}/secrets/{name}",
            {"namespace": namespace, "name": name},
            op=op,
            absent_ok=True,
        )

    def create_secret(
        self, namespace: str, body: Mapping[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        """Create the Secret (``dryRun=All`` when ``dry_run``) and return what the server stored."""
        name = str((body.get("metadata") or {}).get("name") or "")
        op = Operation("create", "secrets", namespace, name, self.server)
        return self._required(
            self._call(
                "POST",
                "/api/v1/namespaces/{namespace}/secrets",
                {"namespace": namespace},
                op=op,
                body=body,
                query=self._write_query(dry_run),
                writes=not dry_run,
            ),
            op,
        )

    def replace_secret(
        self, namespace: str, name: str, body: Mapping[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        """Replace (PUT) the Secret; ``body`` carries the resourceVersion that was read."""
        op = Operation("update", "secrets", namespace, name, self.server)
        return self._required(
            self._call(
                "PUT",
                "/api/v1/namespaces/{namespace}/secrets/{name}",
                {"namespace": namespace, "name": name},
                op=op,
                body=body,
                query=self._write_query(dry_run),
                writes=not dry_run,
            ),
            op,
        )

    def read_namespace(self, name: str) -> dict[str, Any]:
        """Return the Namespace object (NamespaceNotFound when it does not exist)."""
        op = Operation("get", "namespaces", name, name, self.server)
        return self._required(
            self._call("GET", "/api/v1/namespaces/{name}", {"name": name}, op=op), op
        )

    def can_i(self, namespace: str, verb: str, resource: str = "secrets") -> AccessReview:
        """Ask the server (SelfSubjectAccessReview) whether we may ``verb`` ``resource`` there."""
        op = Operation("create", "selfsubjectaccessreviews", namespace, None, self.server)
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "group": "",
                    "resource": resource,
                }
            },
        }
        answer = self._required(
            self._call(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                {},
                op=op,
                body=review,
            ),
            op,
        )
        status = answer.get("status") or {}
        return AccessReview(
            allowed=bool(status.get("allowed")),
            reason=str(status.get("reason") or status.get("evaluationError") or ""),
        )

    def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        """Return every Pod of the namespace (paged, ``LIST_PAGE_SIZE`` per request)."""
        return self._list("/api/v1/namespaces/{namespace}/pods", "pods", namespace)

    def list_ingresses(self, namespace: str) -> list[dict[str, Any]]:
        """Return every networking.k8s.io/v1 Ingress of the namespace (paged)."""
        return self._list(
            "/apis/networking.k8s.io/v1/namespaces/{namespace}/ingresses", "ingresses", namespace
        )

    def _list(self, path: str, resource: str, namespace: str) -> list[dict[str, Any]]:
        op = Operation("list", resource, namespace, None, self.server)
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = [("limit", str(LIST_PAGE_SIZE))] + ([("continue", token)] if token else [])
            page = self._required(
                self._call("GET", path, {"namespace": namespace}, op=op, query=query), op
            )
            items += [item for item in page.get("items") or () if isinstance(item, dict)]
            token = str((page.get("metadata") or {}).get("continue") or "")
            if not token:
                return items

    # --- plumbing -------------------------------------------------------------------------

    @staticmethod
    def _write_query(dry_run: bool) -> list[tuple[str, str]]:
        query = [("fieldManager", FIELD_MANAGER)]
        if dry_run:
            query.append(("dryRun", "All"))
        return query

    @staticmethod
    def _required(result: dict[str, Any] | None, op: Operation) -> dict[str, Any]:
        if result is None:  # only reachable if a 2xx answer had an empty body
            raise UnexpectedResponse(f"empty answer for {op.target()}")
        return result

    def _call(
        self,
        method: str,
        path: str,
        path_params: dict[str, str],
        *,
        op: Operation,
        body: Mapping[str, Any] | None = None,
        query: list[tuple[str, str]] | None = None,
        absent_ok: bool = False,
        writes: bool = False,
    ) -> dict[str, Any] | None:
        # A write whose request may have reached the server without an answer coming back
        # (any attempt): unless a later attempt gets an HTTP answer, its fate is unknown.
        unconfirmed = False

        def attempt() -> dict[str, Any] | None:
            nonlocal unconfirmed
            try:
                status, raw, headers = self._send(method, path, path_params, body, query, op)
            except KubeTransportError as err:
                unconfirmed = unconfirmed or (writes and request_may_have_arrived(err.__cause__))
                raise
            if 200 <= status < 300:
                return self._parse(raw, op) if raw else None
            if status == 404 and absent_ok:
                return None
            raise error_from_response(status, raw, headers, op)

        try:
            return self._with_retries(attempt)
        except KubeError as err:
            # A definite answer (409 after the write landed, 422, 403) settles it; the retries
            # running out on a transient failure (transport, 429, 5xx) does not.
            if not (unconfirmed and err.retryable):
                raise
            raise WriteUnconfirmed(
                f"the write of {op.target()} was sent but no answer came back, so it may "
                f"have landed ({err.message})"
            ) from err

    def _with_retries(self, fn: Callable[[], T]) -> T:
        policy = self._retry
        retrying = Retrying(
            stop=stop_after_attempt(max(1, policy.attempts))
            | stop_before_delay(policy.max_seconds),
            wait=_Wait(policy),
            retry=retry_if_exception(_retryable),
            sleep=policy.sleep,
            before_sleep=self._count_retry,
            reraise=True,
        )
        return retrying(fn)

    def _count_retry(self, state: RetryCallState) -> None:
        with self._lock:
            self.retries_made += 1
        if self._retry.on_retry is not None:
            failed = state.outcome.exception() if state.outcome is not None else None
            self._retry.on_retry(retry_status_class(failed))

    def _send(
        self,
        method: str,
        path: str,
        path_params: dict[str, str],
        body: Mapping[str, Any] | None,
        query: list[tuple[str, str]] | None,
        op: Operation,
    ) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            self.requests_made += 1
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            request = self._api.param_serialize(
                method=method,
                resource_path=path,
                path_params=path_params,
                query_params=query or [],
                header_params=headers,
                body=dict(body) if body is not None else None,
                auth_settings=["BearerToken"],
            )
            response = self._api.call_api(*request, _request_timeout=self._timeout)
            try:
                raw = response.read() or b""  # type: ignore[no-untyped-call]
            finally:
                response.response.release_conn()
            return int(response.status), raw, dict(response.headers or {})
        except _LIBRARY_ERRORS as exc:
            raise translate(exc, op) from exc

    @staticmethod
    def _parse(raw: bytes, op: Operation) -> dict[str, Any]:
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnexpectedResponse(
                f"the answer for {op.target()} is not JSON ({len(raw)} bytes)"
            ) from exc
        if not isinstance(parsed, dict):
            raise UnexpectedResponse(f"the answer for {op.target()} is not a JSON object")
        return parsed
