"""The Kubernetes module's errors: HTTP answers and library exceptions map to our classes.

Pure unit tests: the "transport" below is a fake urllib3 pool inside a real ApiClient, the
narrow seam between the module and the network. No client-library exception may escape.
"""

from __future__ import annotations

import inspect
import io
import json
import pickle
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
import urllib3.exceptions as u3
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.client import exceptions as kexc

from worker.kube import errors
from worker.kube.client import KubeClient, RetryPolicy
from worker.kube.connect import ConnectionSpec, build_api_client
from worker.kube.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    ImmutableSecret,
    InvalidData,
    KubeError,
    KubeTimeout,
    NamespaceNotFound,
    NotFound,
    Operation,
    SecretTooLarge,
    SecretTypeConflict,
    ServerError,
    Throttled,
    TlsVerificationFailed,
    Unauthorized,
    UnexpectedResponse,
    Unreachable,
    WriteUnconfirmed,
    error_from_response,
    parse_retry_after,
    request_may_have_arrived,
    scrub,
    translate,
)

SA_USER = "system:serviceaccount:ingress:certautopilot"
UPDATE_OP = Operation("update", "secrets", "ingress", "web-tls", "https://127.0.0.1:6443")
CREATE_OP = Operation("create", "secrets", "edge", "web-tls", "https://127.0.0.1:6443")


def status_body(code: int, reason: str, message: str, **details: Any) -> bytes:
    """A Kubernetes Status object as the API server sends it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return json.dumps(body).encode()


def rbac_denial(verb: str, resource: str = "secrets", user: str = SA_USER) -> bytes:
    return status_body(
        403,
        "Forbidden",
        f'{resource} "web-tls" is forbidden: User "{user}" cannot {verb} resource '
        f'"{resource}" in API group "" in the namespace "ingress"',
        name="web-tls",
        kind=resource,
    )


# --- the message format and the spec's troubleshooting texts --------------------------------


def test_str_is_message_then_fix() -> None:
    err = Unreachable("cannot connect to https://x", fix="Start it.")
    assert str(err) == "cannot connect to https://x — fix: Start it."


def test_update_denial_uses_the_spec_wording_and_fix() -> None:
    err = error_from_response(403, rbac_denial("update"), None, UPDATE_OP)
    assert isinstance(err, Forbidden)
    assert "forbidden: secrets cannot be updated" in err.message
    assert (
        err.fix == "ServiceAccount lacks update verb in the target namespace. Fix the RoleBinding."
    )
    assert (err.verb, err.resource, err.namespace, err.status) == (
        "update",
        "secrets",
        "ingress",
        403,
    )
    assert "cannot update resource" in err.message  # the API's own words are kept too
    assert err.retryable is False


@pytest.mark.parametrize(
    ("verb", "participle"),
    [("get", "read"), ("create", "created"), ("patch", "patched"), ("update", "updated")],
)
def test_denial_names_the_missing_verb(verb: str, participle: str) -> None:
    err = error_from_response(403, rbac_denial(verb), None, UPDATE_OP)
    assert isinstance(err, Forbidden)
    assert f"forbidden: secrets cannot be {participle}" in err.message
    assert f"lacks {verb} verb" in err.fix


def test_denial_of_a_non_serviceaccount_user_names_that_user() -> None:
    err = error_from_response(403, rbac_denial("update", user="alice"), None, UPDATE_OP)
    assert 'User "alice"' in err.fix and "Fix the RoleBinding." in err.fix


def test_denial_without_a_body_falls_back_to_the_attempted_operation() -> None:
    err = error_from_response(403, b"", None, CREATE_OP)
    assert isinstance(err, Forbidden)
    assert err.message.startswith('forbidden: secrets cannot be created in namespace "edge"')
    assert "lacks create verb" in err.fix


def test_a_non_rbac_refusal_keeps_the_servers_reason_and_does_not_blame_the_rolebinding() -> None:
    body = status_body(
        403,
        "Forbidden",
        'secrets "web-tls" is forbidden: unable to create new content in namespace edge because '
        "it is being terminated",
    )
    err = error_from_response(403, body, None, CREATE_OP)
    assert isinstance(err, Forbidden)
    assert "being terminated" in err.message
    assert "RoleBinding" not in err.fix


def test_missing_namespace_uses_the_spec_wording_and_fix() -> None:
    body = status_body(
        404, "NotFound", 'namespaces "edge" not found', name="edge", kind="namespaces"
    )
    err = error_from_response(404, body, None, CREATE_OP)
    assert isinstance(err, NamespaceNotFound)
    assert err.message == 'namespaces "edge" not found'
    assert err.fix == (
        "The module does not create namespaces. Create the namespace first, then retry."
    )
    assert err.namespace == "edge"


# --- every status maps to one class ----------------------------------------------------------

STATUS_CASES: list[tuple[str, int, bytes, dict[str, str] | None, type[KubeError], bool]] = [
    ("401", 401, status_body(401, "Unauthorized", "Unauthorized"), None, Unauthorized, False),
    (
        "404 secret",
        404,
        status_body(404, "NotFound", 'secrets "web-tls" not found', kind="secrets"),
        None,
        NotFound,
        False,
    ),
    (
        "409 stale resourceVersion",
        409,
        status_body(
            409,
            "Conflict",
            'Operation cannot be fulfilled on secrets "web-tls": the object has been modified',
        ),
        None,
        Conflict,
        False,
    ),
    (
        "409 already exists",
        409,
        status_body(409, "AlreadyExists", 'secrets "web-tls" already exists'),
        None,
        AlreadyExists,
        False,
    ),
    (
        "422 type immutable",
        422,
        status_body(
            422,
            "Invalid",
            'Secret "web-tls" is invalid: type: Invalid value: "kubernetes.io/tls": field is '
            "immutable",
            causes=[{"reason": "FieldValueInvalid", "field": "type"}],
        ),
        None,
        SecretTypeConflict,
        False,
    ),
    (
        "422 immutable secret",
        422,
        status_body(
            422,
            "Invalid",
            'Secret "web-tls" is invalid: data: Forbidden: field is immutable when `immutable` '
            "is set",
            causes=[{"reason": "FieldValueForbidden", "field": "data"}],
        ),
        None,
        ImmutableSecret,
        False,
    ),
    (
        "422 invalid data",
        422,
        status_body(
            422,
            "Invalid",
            'Secret "web-tls" is invalid: data[tls.key]: Required value',
            causes=[{"reason": "FieldValueRequired", "field": "data[tls.key]"}],
        ),
        None,
        InvalidData,
        False,
    ),
    ("400", 400, status_body(400, "BadRequest", "bad body"), None, InvalidData, False),
    ("413", 413, b"request entity too large", None, SecretTooLarge, False),
    (
        "429",
        429,
        status_body(429, "TooManyRequests", "too many requests"),
        {"Retry-After": "3"},
        Throttled,
        True,
    ),
    ("500", 500, status_body(500, "InternalError", "etcd down"), None, ServerError, True),
    ("502 no body", 502, b"", None, ServerError, True),
    ("503", 503, b"<html>unavailable</html>", None, ServerError, True),
    ("504", 504, status_body(504, "Timeout", "timeout"), None, ServerError, True),
    ("418", 418, b"teapot", None, UnexpectedResponse, False),
]


EVERY_STATUS = pytest.mark.parametrize(
    ("status", "body", "headers", "expected", "retryable"),
    [case[1:] for case in STATUS_CASES],
    ids=[case[0] for case in STATUS_CASES],
)


@EVERY_STATUS
def test_every_error_status_maps_to_its_class(
    status: int,
    body: bytes,
    headers: dict[str, str] | None,
    expected: type[KubeError],
    retryable: bool,
) -> None:
    err = error_from_response(status, body, headers, UPDATE_OP)
    assert type(err) is expected
    assert err.retryable is retryable
    assert err.status == status
    assert err.fix and err.message


def test_throttled_carries_the_retry_after_delay() -> None:
    err = error_from_response(429, b"", {"retry-after": "7"}, UPDATE_OP)
    assert isinstance(err, Throttled) and err.retry_after == 7.0


@pytest.mark.parametrize("status", [500, 503, 504])
def test_a_server_error_carries_the_retry_after_delay(status: int) -> None:
    err = error_from_response(status, b"", {"Retry-After": "3"}, UPDATE_OP)
    assert isinstance(err, ServerError) and err.retry_after == 3.0
    assert error_from_response(status, b"", None, UPDATE_OP).retry_after is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("5", 5.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
        (None, None),
        ("", None),
    ],
)
def test_retry_after_accepts_seconds_and_http_dates(
    header: str | None, expected: float | None
) -> None:
    from datetime import UTC, datetime

    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected


# --- every library exception maps: nothing escapes --------------------------------------------


def _library_exception_classes() -> list[type[BaseException]]:
    classes: set[type[BaseException]] = set()
    for module in (kexc, u3):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and not issubclass(obj, Warning):
                classes.add(obj)
    classes |= {
        ssl.SSLError,
        ssl.SSLCertVerificationError,
        ssl.SSLEOFError,
        ConnectionRefusedError,
        ConnectionResetError,
        TimeoutError,
        socket.gaierror,
        OSError,
    }
    return sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _bare(cls: type[BaseException], text: str = "boom") -> BaseException:
    # Constructors differ per class: try the usual shapes, else build the object without its
    # constructor (attributes a constructor would set are then missing: the mapper copes).
    for args in ((), (text,)):
        try:
            return cls(*args)
        except Exception:  # noqa: S112 - try the next constructor shape
            continue
    exc = cls.__new__(cls)
    BaseException.__init__(exc, text)
    return exc


LIBRARY_EXCEPTIONS = _library_exception_classes()


@pytest.mark.parametrize("cls", LIBRARY_EXCEPTIONS, ids=lambda c: c.__qualname__)
def test_every_library_exception_class_maps_to_a_kube_error(cls: type[BaseException]) -> None:
    mapped = translate(_bare(cls), UPDATE_OP)
    assert isinstance(mapped, KubeError)
    assert mapped.reason and mapped.fix and mapped.message


def test_the_enumeration_covers_the_client_and_urllib3_exception_modules() -> None:
    names = {cls.__qualname__ for cls in LIBRARY_EXCEPTIONS}
    assert {"ApiException", "ApiTypeError", "ApiValueError", "MaxRetryError"} <= names
    assert len(LIBRARY_EXCEPTIONS) > 40


REAL_EXCEPTIONS: list[tuple[str, Callable[[], BaseException], type[KubeError], str]] = [
    (
        "connection refused",
        lambda: u3.NewConnectionError(
            None,  # type: ignore[arg-type]
            "Failed to establish a new connection: [Errno 111] Connection refused",
        ),
        Unreachable,
        "Connection refused",
    ),
    (
        "max retries wrapping refused",
        lambda: u3.MaxRetryError(
            None,  # type: ignore[arg-type]
            "/api",
            u3.NewConnectionError(None, "[Errno 111] Connection refused"),  # type: ignore[arg-type]
        ),
        Unreachable,
        "Connection refused",
    ),
    (
        "dns",
        lambda: u3.NameResolutionError(
            "nowhere.invalid",
            None,  # type: ignore[arg-type]
            socket.gaierror("no"),
        ),
        Unreachable,
        "resolve",
    ),
    ("connect timeout", lambda: u3.ConnectTimeoutError("timed out"), KubeTimeout, "timed out"),
    (
        "read timeout",
        lambda: u3.ReadTimeoutError(None, "/api", "Read timed out."),  # type: ignore[arg-type]
        KubeTimeout,
        "did not answer",
    ),
    (
        "ssl verify via the REST layer",
        lambda: kexc.ApiException(
            status=0,
            reason="SSLError\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "unable to get local issuer certificate (_ssl.c:1006)",
        ),
        TlsVerificationFailed,
        "unable to get local issuer certificate",
    ),
    (
        "ssl verify raw",
        lambda: ssl.SSLCertVerificationError(
            1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"
        ),
        TlsVerificationFailed,
        "self-signed",
    ),
    (
        "ssl hostname mismatch",
        lambda: u3.SSLError(
            "hostname '10.0.0.1' doesn't match either of 'kubernetes', 'kubernetes.default'"
        ),
        TlsVerificationFailed,
        "doesn't match",
    ),
    (
        "tls handshake eof",
        lambda: u3.SSLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
        Unreachable,
        "handshake",
    ),
    (
        "connection reset",
        lambda: u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")),
        Unreachable,
        "broke",
    ),
    (
        "api exception 403",
        lambda: _api_exception(403, rbac_denial("update")),
        Forbidden,
        "forbidden: secrets cannot be updated",
    ),
    (
        "api exception 429",
        lambda: _api_exception(429, b"", {"Retry-After": "2"}),
        Throttled,
        "throttled",
    ),
    ("api value error", lambda: kexc.ApiValueError("bad"), UnexpectedResponse, "refused to build"),
]


def _api_exception(
    status: int, body: bytes, headers: dict[str, str] | None = None
) -> BaseException:
    exc = kexc.ApiException(status=status, reason="x")
    exc.body = body.decode()
    exc.headers = headers
    return exc


@pytest.mark.parametrize(
    ("make", "expected", "fragment"),
    [case[1:] for case in REAL_EXCEPTIONS],
    ids=[case[0] for case in REAL_EXCEPTIONS],
)
def test_real_exceptions_map_to_their_cause(
    make: Callable[[], BaseException], expected: type[KubeError], fragment: str
) -> None:
    mapped = translate(make(), UPDATE_OP)
    assert type(mapped) is expected
    assert fragment in mapped.message


def test_kube_errors_pass_through_translate_untouched() -> None:
    err = Unauthorized("unauthorized")
    assert translate(err) is err


def test_errors_survive_pickling_with_every_attribute() -> None:
    err = error_from_response(429, b"", {"Retry-After": "4"}, UPDATE_OP)
    err.details["diff"] = {"action": "update"}
    clone = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own bytes
    assert type(clone) is Throttled
    assert (clone.message, clone.fix, clone.status, clone.retryable, clone.retry_after) == (
        err.message,
        err.fix,
        429,
        True,
        4.0,
    )
    assert clone.details == {"diff": {"action": "update"}}
    assert str(clone) == str(err)


# --- secrets never appear in messages --------------------------------------------------------

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLWJ5dGVz"
PEM_KEY = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB7xc2VjcmV0\n-----END EC PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Authorization: Bearer {JWT}", JWT),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        (f"token expired: {JWT}", JWT),
        ("bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
        (f"bad key {PEM_KEY} end", "MHcCAQEEIB7xc2VjcmV0"),
        ("client-key-data: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0t", "LS0tLS1CRUdJTiBFQyBQUk"),
        ('"token": "s3cr3t-value"', "s3cr3t-value"),
    ],
)
def test_scrub_removes_credentials(text: str, secret: str) -> None:
    assert secret not in scrub(text)


TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


@given(st.text(alphabet=TOKEN_ALPHABET, min_size=8))
def test_no_bearer_token_survives_in_an_error_message(token: str) -> None:
    err = error_from_response(
        401, status_body(401, "Unauthorized", f"bad header Authorization: Bearer {token}"), None
    )
    assert f"Bearer {token}" not in str(err)
    assert f"Bearer {token}" not in repr(err)


# --- KubeClient over a fake transport --------------------------------------------------------


class FakePool:
    """Stands in for urllib3's PoolManager: scripted answers or exceptions, requests recorded."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.HTTPResponse:
        self.requests.append({"method": method, "url": url, **kwargs})
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, BaseException):
            raise step
        status, body, headers = step
        return urllib3.HTTPResponse(
            body=io.BytesIO(body), status=status, headers=headers or {}, preload_content=False
        )

    def clear(self) -> None:
        pass


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fake_client(script: list[Any], **policy: Any) -> tuple[KubeClient, FakePool, Sleeps]:
    api = build_api_client(
        ConnectionSpec(server="https://127.0.0.1:1", token="fake-token"),
        connect_timeout=1,
        read_timeout=1,
    )
    pool = FakePool(script)
    api.rest_client.pool_manager = pool  # type: ignore[assignment]
    sleeps = Sleeps()
    retry = RetryPolicy(**{"attempts": 4, "max_seconds": 60, "sleep": sleeps, **policy})
    return KubeClient(api, retry=retry), pool, sleeps


SECRET = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {"name": "web-tls", "resourceVersion": "7"},
}
OK = (200, json.dumps(SECRET).encode(), {"Content-Type": "application/json"})


@pytest.fixture
def only_kube_errors() -> Iterator[None]:
    """Fail the test if anything but a KubeError leaves the client."""
    try:
        yield
    except KubeError:
        raise
    except Exception as exc:  # pragma: no cover - this is the failure being guarded against
        pytest.fail(f"{type(exc).__module__}.{type(exc).__name__} escaped the Kubernetes module")


@pytest.mark.parametrize("cls", LIBRARY_EXCEPTIONS, ids=lambda c: c.__qualname__)
def test_no_library_exception_escapes_the_client(cls: type[BaseException]) -> None:
    client, _, _ = fake_client([_bare(cls)], attempts=2)
    with pytest.raises(KubeError) as caught:
        client.read_secret("ingress", "web-tls")
    cause = caught.value.__cause__  # chained `from exc`
    # The REST layer itself re-raises urllib3's SSLError as ApiException(status=0).
    wrapped = issubclass(cls, u3.SSLError) and isinstance(cause, kexc.ApiException)
    assert isinstance(cause, cls) or wrapped
    assert client.requests_made == (2 if caught.value.retryable else 1)


@EVERY_STATUS
def test_the_client_maps_every_error_status(
    status: int,
    body: bytes,
    headers: dict[str, str] | None,
    expected: type[KubeError],
    retryable: bool,
) -> None:
    client, _, _ = fake_client([(status, body, headers)], attempts=3)
    with pytest.raises(expected):
        client.replace_secret("ingress", "web-tls", SECRET)
    assert client.requests_made == (3 if retryable else 1)


def test_read_of_an_absent_secret_returns_none() -> None:
    client, _, _ = fake_client([(404, status_body(404, "NotFound", "nope"), None)])
    assert client.read_secret("ingress", "web-tls") is None
    assert client.requests_made == 1


def test_transient_failures_are_retried_then_succeed() -> None:
    client, _, sleeps = fake_client([(503, b"", None), u3.ProtocolError("Connection aborted."), OK])
    assert client.read_secret("ingress", "web-tls") == SECRET
    assert (client.requests_made, client.retries_made, len(sleeps)) == (3, 2, 2)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_over_a_shorter_backoff(status: int) -> None:
    client, _, sleeps = fake_client([(status, b"", {"Retry-After": "9"}), OK], initial_backoff=0.1)
    client.read_secret("ingress", "web-tls")
    assert sleeps == [9.0]


def test_a_server_error_without_retry_after_uses_the_backoff_alone() -> None:
    client, _, sleeps = fake_client([(503, b"", None), OK], initial_backoff=0.5, jitter=0)
    client.read_secret("ingress", "web-tls")
    assert sleeps == [0.5]


def test_backoff_grows_exponentially_and_is_capped() -> None:
    client, _, sleeps = fake_client(
        [(500, b"", None)], attempts=6, initial_backoff=1, max_backoff=4, jitter=0
    )
    with pytest.raises(ServerError):
        client.read_secret("ingress", "web-tls")
    assert sleeps == [1, 2, 4, 4, 4]


def test_retries_stop_when_the_time_budget_would_be_exceeded() -> None:
    client, _, sleeps = fake_client([(429, b"", {"Retry-After": "100"}), OK], max_seconds=30)
    with pytest.raises(Throttled):
        client.read_secret("ingress", "web-tls")
    assert (client.requests_made, sleeps) == (1, [])


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_permanent_failures_are_not_retried(status: int) -> None:
    client, _, sleeps = fake_client([(status, b"", None)])
    with pytest.raises(KubeError):
        client.replace_secret("ingress", "web-tls", SECRET)
    assert (client.requests_made, sleeps) == (1, [])


def test_a_non_json_answer_is_an_unexpected_response() -> None:
    client, _, _ = fake_client([(200, b"<html>login</html>", None)])
    with pytest.raises(UnexpectedResponse, match="not JSON"):
        client.read_namespace("ingress")


def test_writes_send_field_manager_and_dry_run_and_the_bearer_token() -> None:
    client, pool, _ = fake_client([OK])
    client.create_secret("ingress", SECRET, dry_run=True)
    sent = pool.requests[0]
    assert sent["method"] == "POST"
    assert sent["url"] == (
        "https://127.0.0.1:1/api/v1/namespaces/ingress/secrets?fieldManager=certautopilot&dryRun=All"
    )
    headers = {key.lower(): value for key, value in sent["headers"].items()}
    assert headers["authorization"] == "Bearer fake-token"
    assert json.loads(sent["body"]) == SECRET
    assert sent["timeout"].connect_timeout == 1


# A write whose answer never came may have landed: the client must not report it as a plain
# "unreachable" (nothing changed). Built as urllib3 raises them (refused connect, read
# timeout, a connection cut mid-request) and as the REST layer wraps a TLS failure.
REFUSED = u3.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] refused")  # type: ignore[arg-type]
CUT = u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
READ_TIMEOUT = u3.ReadTimeoutError(None, "/api", "Read timed out.")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "may_have_arrived"),
    [
        (REFUSED, False),
        (u3.ConnectTimeoutError("connect timed out"), False),
        (u3.NameResolutionError("nowhere.invalid", None, socket.gaierror(-2, "unknown")), False),  # type: ignore[arg-type]
        (u3.MaxRetryError(None, "/api", REFUSED), False),  # type: ignore[arg-type]
        (ConnectionRefusedError(111, "refused"), False),
        (u3.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), False),
        (CUT, True),
        (READ_TIMEOUT, True),
        (u3.MaxRetryError(None, "/api", READ_TIMEOUT), True),  # type: ignore[arg-type]
        (u3.SSLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")), True),
        (ConnectionResetError(104, "reset"), True),
    ],
    ids=repr,
)
def test_only_failures_before_sending_prove_a_request_never_arrived(
    exc: BaseException, may_have_arrived: bool
) -> None:
    assert request_may_have_arrived(exc) is may_have_arrived


@pytest.mark.parametrize("ambiguous", [CUT, READ_TIMEOUT], ids=repr)
@pytest.mark.parametrize("write", ["create", "replace"])
def test_a_write_cut_off_before_its_answer_is_reported_unconfirmed_not_unreachable(
    ambiguous: BaseException, write: str
) -> None:
    # The first attempt may have landed; the retries then cannot connect at all.
    client, _, _ = fake_client([ambiguous, REFUSED], attempts=3)
    with pytest.raises(WriteUnconfirmed) as caught:
        if write == "create":
            client.create_secret("ingress", SECRET)
        else:
            client.replace_secret("ingress", "web-tls", SECRET)
    assert caught.value.reason == "write_unconfirmed"
    assert "may have landed" in caught.value.message
    assert "reads the Secret back" in caught.value.fix
    assert client.requests_made == 3


def test_a_write_refused_before_sending_every_time_is_plainly_unreachable() -> None:
    client, _, _ = fake_client([REFUSED], attempts=3)
    with pytest.raises(Unreachable) as caught:
        client.replace_secret("ingress", "web-tls", SECRET)
    assert type(caught.value) is Unreachable


@pytest.mark.parametrize(
    ("after", "expected"),
    [((409, status_body(409, "Conflict", "changed"), None), Conflict), ((503, b"", None), None)],
    ids=["409 settles it", "5xx does not"],
)
def test_a_later_answer_decides_whether_an_ambiguous_write_is_still_unconfirmed(
    after: Any, expected: type[KubeError] | None
) -> None:
    client, _, _ = fake_client([CUT, after], attempts=2)
    with pytest.raises(KubeError) as caught:
        client.replace_secret("ingress", "web-tls", SECRET)
    assert type(caught.value) is (expected or WriteUnconfirmed)


def test_a_write_retried_to_success_after_a_cut_is_just_a_success() -> None:
    client, _, _ = fake_client([CUT, OK], attempts=2)
    assert client.replace_secret("ingress", "web-tls", SECRET) == SECRET


def test_reads_and_dry_runs_cut_off_are_unreachable_they_change_nothing() -> None:
    client, _, _ = fake_client([CUT], attempts=2)
    with pytest.raises(Unreachable) as read:
        client.read_secret("ingress", "web-tls")
    with pytest.raises(Unreachable) as dry:
        client.create_secret("ingress", SECRET, dry_run=True)
    assert type(read.value) is type(dry.value) is Unreachable


def test_can_i_reads_the_access_review_answer() -> None:
    review = {"status": {"allowed": False, "reason": "no RBAC policy matched"}}
    client, pool, _ = fake_client([(201, json.dumps(review).encode(), None)])
    answer = client.can_i("ingress", "update")
    assert (answer.allowed, answer.reason) == (False, "no RBAC policy matched")
    sent = json.loads(pool.requests[0]["body"])
    assert sent["spec"]["resourceAttributes"] == {
        "namespace": "ingress",
        "verb": "update",
        "group": "",
        "resource": "secrets",
    }


def test_errors_module_imports_without_the_client_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, worker.kube.errors, worker.core.secret; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('kubernetes', 'celery', 'sqlalchemy', 'urllib3')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert errors.__doc__ and "KubeError" in errors.__doc__
