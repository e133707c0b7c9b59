"""Verify serving: the TLS probe (socket + ssl I/O) and the concurrent verification of a
message's targets. What to probe, how often and how to say it is :mod:`worker.core.serving`.

The probe is deliberately narrow:

* it connects only to the addresses the endpoint's own host resolves to (or its IP literal):
  no redirects, no other host, nothing followed; with "public only" every resolved address
  is checked before one is connected to, and the checked address is the one dialled (a
  second resolution cannot swap in another);
* it performs a TLS handshake (the ClientHello and the client's handshake replies) with
  verification off, reads the presented leaf, and closes: no application data, no HTTP
  request, nothing else is ever sent;
* when a CA is configured and the leaf is the new one, one more handshake, this time
  verifying the chain and the host name against that CA, says whether the chain validates;
* every connect and handshake has a timeout (5 s, cut to what is left of the deadline).

It runs in the worker (the place with network reach to the clusters' ingresses), after a
message's writes, for all of the message's targets at once: a message of 32 targets costs at
most one deadline, not 32 (see :mod:`worker.app.runs`).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from worker.core.serving import (
    HANDSHAKE_TIMEOUT_SECONDS,
    Endpoint,
    EndpointResult,
    ServingState,
    address_problem,
    delay_after,
)

__all__ = [
    "Presented",
    "ProbeError",
    "ServingRequest",
    "probe",
    "verify_endpoint",
    "verify_requests",
]

log = logging.getLogger(__name__)

#: Threads verifying at once in one pool process (endpoints beyond wait for a free one).
MAX_PARALLEL_PROBES = 32


class ProbeError(Exception):
    """One attempt failed before a leaf was read; the message is the reason shown."""


@dataclass(frozen=True)
class Presented:
    """The leaf an endpoint presented."""

    sha256: str
    serial: str
    not_after: datetime


@dataclass(frozen=True)
class ServingRequest:
    """One target's verification: its endpoints, what they must present, and how to check."""

    key: str
    """The caller's handle for the target (its id)."""
    endpoints: tuple[Endpoint, ...]
    expected_sha256: str
    sni: str | None
    """The default SNI (the certificate's CN or first DNS SAN) for endpoints without sni=."""
    deadline: float
    """Seconds each of this target's endpoints may take (already cut to the task's budget)."""
    until: float | None = None
    """A ``time.monotonic()`` no endpoint's probing goes past (the task's budget), also for an
    endpoint that waited for a free probe thread."""
    public_only: bool = False
    ca_pem: str | None = None
    """Trust anchors for the chain check (a bundle, or the certificate's own chain); None:
    no chain check."""


def _resolve(endpoint: Endpoint, *, public_only: bool) -> list[str]:
    if endpoint.is_ip:
        addresses = [endpoint.host]
    else:
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ProbeError(f"cannot resolve {endpoint.host} ({exc.strerror})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if public_only:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise ProbeError(
                    f"{endpoint.host} resolves to a non-public address ({problem}), and the "
                    "target requires public endpoints"
                )
    return addresses


def _handshake(address: str, port: int, sni: str, context: ssl.SSLContext, timeout: float) -> bytes:
    """Connect, handshake, read the leaf's DER, close. Nothing but the handshake is sent."""
    with socket.create_connection((address, port), timeout=timeout) as raw:
        raw.settimeout(timeout)
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ProbeError("the server presented no certificate")
    return der


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ProbeError):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or "certificate verification failed"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


def _open_context() -> ssl.SSLContext:
    # Verification off on purpose: the probe must read whatever leaf is served (an old, an
    # expired or a self-signed one) to compare fingerprints; trust is judged separately.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _verifying_context(ca_pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem)
    # The certificate's own chain holds intermediates, which are anchors only with this flag.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def probe(endpoint: Endpoint, sni: str, timeout: float, *, public_only: bool = False) -> Presented:
    """One attempt: the leaf ``endpoint`` presents for ``sni`` (ProbeError with the reason)."""
    addresses = _resolve(endpoint, public_only=public_only)
    last: BaseException | None = None
    for address in addresses:
        try:
            der = _handshake(address, endpoint.port, sni, _open_context(), timeout)
        except (OSError, ProbeError) as exc:
            last = exc
            continue
        try:
            leaf = x509.load_der_x509_certificate(der)
        except ValueError:
            raise ProbeError("the presented certificate cannot be parsed") from None
        return Presented(
            sha256=hashlib.sha256(der).hexdigest(),
            serial=format(leaf.serial_number, "x"),
            not_after=leaf.not_valid_after_utc.astimezone(UTC),
        )
    raise ProbeError(_reason(last) if last is not None else f"{endpoint.host}: no address")


def check_chain(
    endpoint: Endpoint, sni: str, ca_pem: str, timeout: float, *, public_only: bool = False
) -> str | None:
    """One verifying handshake: None when the chain and host name validate, else why not."""
    try:
        context = _verifying_context(ca_pem)
    except ssl.SSLError as exc:
        return f"the configured CA bundle cannot be loaded ({exc.reason})"
    try:
        address = _resolve(endpoint, public_only=public_only)[0]
        _handshake(address, endpoint.port, sni, context, timeout)
    except (OSError, ProbeError) as exc:
        return _reason(exc)
    return None


def verify_endpoint(
    endpoint: Endpoint,
    request: ServingRequest,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    probe_once: Callable[..., Presented] = probe,
) -> EndpointResult:
    """Probe until the new leaf is served or the request's deadline passes (with backoff)."""
    started = clock()
    ends = started + request.deadline
    if request.until is not None:
        ends = min(ends, request.until)
    sni = endpoint.sni or request.sni
    if sni is None:
        return EndpointResult(
            endpoint=str(endpoint),
            state=ServingState.NOT_VERIFIED,
            seconds=0.0,
            attempts=0,
            reason="no SNI to send: the certificate names only wildcards or IP addresses; "
            "add sni=NAME to the endpoint",
        )
    if ends <= started:
        return EndpointResult(
            endpoint=str(endpoint),
            state=ServingState.NOT_VERIFIED,
            seconds=0.0,
            attempts=0,
            reason="no time left before the task's soft time limit (the writes took it)",
        )
    attempts = 0
    seen: Presented | None = None
    failure = ""
    while True:
        attempts += 1
        timeout = max(0.1, min(HANDSHAKE_TIMEOUT_SECONDS, ends - clock()))
        try:
            seen = probe_once(endpoint, sni, timeout, public_only=request.public_only)
            failure = ""
        except ProbeError as exc:
            seen, failure = None, str(exc)
        if seen is not None and seen.sha256 == request.expected_sha256:
            took = clock() - started
            if request.ca_pem is None:
                return EndpointResult(
                    str(endpoint),
                    ServingState.VERIFIED,
                    took,
                    attempts,
                    seen.serial,
                    seen.not_after,
                )
            # The new leaf is there: the chain check may outlast the endpoint's deadline by
            # one handshake, never the task's budget.
            budget = float("inf") if request.until is None else request.until - clock()
            problem = check_chain(
                endpoint,
                sni,
                request.ca_pem,
                max(0.1, min(HANDSHAKE_TIMEOUT_SECONDS, budget)),
                public_only=request.public_only,
            )
            return EndpointResult(
                str(endpoint),
                ServingState.VERIFIED if problem is None else ServingState.CHAIN_INVALID,
                took,
                attempts,
                seen.serial,
                seen.not_after,
                reason=problem,
                chain="valid" if problem is None else "invalid",
            )
        left = ends - clock()
        if left <= 0:
            break
        sleep(min(delay_after(attempts), left))
    took = clock() - started
    if seen is not None:
        return EndpointResult(
            str(endpoint), ServingState.STALE, took, attempts, seen.serial, seen.not_after
        )
    return EndpointResult(
        str(endpoint), ServingState.UNREACHABLE, took, attempts, reason=failure or "no answer"
    )


def verify_requests(
    requests: Sequence[ServingRequest],
    *,
    verify: Callable[[Endpoint, ServingRequest], EndpointResult] = verify_endpoint,
) -> Mapping[str, list[EndpointResult]]:
    """Verify every endpoint of every request concurrently; results by request key, in the
    endpoints' order. Returns once all finished (each bounds itself by its deadline)."""
    jobs = [(request, endpoint) for request in requests for endpoint in request.endpoints]
    results: dict[str, list[EndpointResult]] = {request.key: [] for request in requests}
    if not jobs:
        return results
    executor = ThreadPoolExecutor(
        max_workers=min(MAX_PARALLEL_PROBES, len(jobs)), thread_name_prefix="certautopilot-serving"
    )
    try:
        futures = [executor.submit(verify, endpoint, request) for request, endpoint in jobs]
        wait(futures)
        for (request, endpoint), future in zip(jobs, futures, strict=True):
            error = future.exception()
            if error is None:
                results[request.key].append(future.result())
                continue
            # A defect in one probe must not lose the other targets' writes or results.
            log.error("verifying %s failed unexpectedly", endpoint, exc_info=error)
            results[request.key].append(
                EndpointResult(
                    str(endpoint),
                    ServingState.NOT_VERIFIED,
                    0.0,
                    0,
                    reason=f"internal error ({type(error).__name__}); the worker log has it",
                )
            )
    finally:
        # An interrupted wait (the task's soft time limit) must not block on running probes:
        # each ends by its own timeout.
        executor.shutdown(wait=False, cancel_futures=True)
    return results
