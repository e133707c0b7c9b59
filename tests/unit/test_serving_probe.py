"""Verify serving, the probe (worker.app.serving): real TLS handshakes against a listener on
127.0.0.1 in this process, and the retry loop on a fake clock.

The listener records every byte a client sends after its handshake: the probe must send none
(only the ClientHello and the client's handshake replies, then close)."""

from __future__ import annotations

import hashlib
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.certfactory import Chain, make_chain
from worker.app.serving import (
    Presented,
    ProbeError,
    ServingRequest,
    check_chain,
    probe,
    verify_endpoint,
    verify_requests,
)
from worker.core.serving import Endpoint, EndpointResult, ServingState


@dataclass
class Listener:
    """A TLS listener on 127.0.0.1 serving one chain, recording what clients send."""

    chain: Chain
    sock: socket.socket = field(init=False)
    handshakes: int = 0
    application_bytes: int = 0
    sni_seen: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        folder = Path(tempfile.mkdtemp())
        (folder / "cert.pem").write_bytes(self.chain.fullchain_pem)
        (folder / "key.pem").write_bytes(self.chain.key_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        self.context.sni_callback = lambda _sock, name, _ctx: self.sni_seen.append(name)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            connection.settimeout(5)
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    self.handshakes += 1
                    while True:  # until the client closes: count what it sends
                        data = tls.recv(1024)
                        if not data:
                            break
                        self.application_bytes += len(data)
            except (OSError, ssl.SSLError):
                pass

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def chain() -> Chain:
    return make_chain(cn="shop.example.com")


@pytest.fixture
def listener(chain: Chain) -> Iterator[Listener]:
    made = Listener(chain)
    yield made
    made.close()


def _sha256(chain: Chain) -> str:
    return hashlib.sha256(chain.leaf.public_bytes(Encoding.DER)).hexdigest()


def test_a_probe_reads_the_presented_leaf_and_sends_nothing_but_the_handshake(
    listener: Listener, chain: Chain
) -> None:
    presented = probe(listener.endpoint, "shop.example.com", timeout=5)
    assert presented.sha256 == _sha256(chain)
    assert presented.serial == format(chain.leaf.serial_number, "x")
    assert presented.not_after == chain.leaf.not_valid_after_utc
    listener.close()
    listener.thread.join(timeout=10)
    assert listener.handshakes == 1
    assert listener.application_bytes == 0
    assert listener.sni_seen == ["shop.example.com"]


def test_an_endpoint_serving_the_new_leaf_is_verified_at_the_first_attempt(
    listener: Listener, chain: Chain
) -> None:
    request = ServingRequest("t", (listener.endpoint,), _sha256(chain), "shop.example.com", 5)
    result = verify_endpoint(listener.endpoint, request)
    assert (result.state, result.attempts) == (ServingState.VERIFIED, 1)
    assert result.line().startswith("verified after ")


def test_the_chain_is_checked_against_the_configured_ca(listener: Listener, chain: Chain) -> None:
    own = (chain.chain_pem + chain.root_pem).decode()
    assert check_chain(listener.endpoint, "shop.example.com", own, 5) is None
    # Only the intermediate as anchor (what "own-chain" gives without a CA): partial chains
    # are accepted.
    assert check_chain(listener.endpoint, "shop.example.com", chain.chain_pem.decode(), 5) is None
    other = make_chain(cn="other.example.com", root_cn="Another Root").root_pem.decode()
    problem = check_chain(listener.endpoint, "shop.example.com", other, 5)
    assert problem is not None and "unable to get local issuer certificate" in problem
    wrong_name = check_chain(listener.endpoint, "www.other.test", own, 5)
    assert wrong_name is not None and "Hostname mismatch" in wrong_name
    request = ServingRequest(
        "t", (listener.endpoint,), _sha256(chain), "shop.example.com", 5, ca_pem=other
    )
    result = verify_endpoint(listener.endpoint, request)
    assert result.state is ServingState.CHAIN_INVALID
    assert result.chain == "invalid"


def test_a_closed_port_is_unreachable_with_the_reason() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(ProbeError, match="connection refused"):
        probe(Endpoint("127.0.0.1", port), "shop.example.com", timeout=2)


def test_a_plain_tcp_server_is_a_tls_handshake_failure() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer_garbage() -> None:
            connection, _ = server.accept()
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            connection.close()

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        with pytest.raises(ProbeError, match=r"TLS handshake failed|connection reset"):
            probe(Endpoint("127.0.0.1", port), "shop.example.com", timeout=2)


def test_a_silent_server_times_out_within_the_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts (backlog), never answers
        port = server.getsockname()[1]
        with pytest.raises(ProbeError, match="timed out"):
            probe(Endpoint("127.0.0.1", port), "shop.example.com", timeout=0.5)


def test_public_only_refuses_a_name_resolving_to_loopback_before_connecting() -> None:
    with pytest.raises(
        ProbeError, match=r"resolves to a non-public address \(127\.0\.0\.1 is a loopback"
    ):
        probe(Endpoint("localhost", 443), "shop.example.com", timeout=1, public_only=True)


def test_an_unresolvable_name_is_unreachable() -> None:
    with pytest.raises(ProbeError, match="cannot resolve"):
        probe(Endpoint("does-not-exist.invalid", 443), "shop.example.com", timeout=1)


# ------------------------------------------------------------------ the loop, on a fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


OLD = Presented("old", "0bad", datetime(2027, 1, 1, tzinfo=UTC))
NEW = Presented("new", "1a2b", datetime(2028, 1, 1, tzinfo=UTC))


def _run(answers: list[Presented | str], deadline: float) -> tuple[EndpointResult, FakeClock]:
    clock = FakeClock()
    endpoint = Endpoint("lb", 443)
    request = ServingRequest("t", (endpoint,), "new", "shop.example.com", deadline)
    calls = iter(answers)

    def probe_once(_endpoint: Endpoint, sni: str, timeout: float, **_: object) -> Presented:
        assert sni == "shop.example.com"
        assert 0 < timeout <= 5
        clock.now += 0.01
        answer = next(calls, answers[-1])
        if isinstance(answer, str):
            raise ProbeError(answer)
        return answer

    result = verify_endpoint(
        endpoint, request, clock=clock, sleep=clock.sleep, probe_once=probe_once
    )
    return result, clock


def test_the_loop_retries_with_backoff_until_the_new_leaf_is_served() -> None:
    result, clock = _run([OLD, OLD, "connection refused", NEW], deadline=60)
    assert (result.state, result.attempts, result.serial) == (ServingState.VERIFIED, 4, "1a2b")
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_an_endpoint_still_serving_the_old_leaf_at_the_deadline_is_stale() -> None:
    result, clock = _run([OLD], deadline=5)
    assert result.state is ServingState.STALE
    assert result.line().startswith(
        "still serving serial 0bad (not-after 2027-01-01 00:00Z) after 5"
    )
    assert clock.now == pytest.approx(5, abs=0.1)  # the last wait is cut to the deadline
    assert result.attempts == len(clock.sleeps) + 1


def test_an_endpoint_never_answering_is_unreachable_with_the_last_reason() -> None:
    result, _ = _run(["connection refused", "timed out"], deadline=3)
    assert result.state is ServingState.UNREACHABLE
    assert result.line().startswith("unreachable: timed out (after 3")


def test_no_sni_or_no_time_means_not_verified_without_a_handshake() -> None:
    endpoint = Endpoint("lb", 443)

    def never(*_: object, **__: object) -> Presented:
        raise AssertionError("no handshake expected")

    no_sni = ServingRequest("t", (endpoint,), "new", None, 5)
    result = verify_endpoint(endpoint, no_sni, probe_once=never)
    assert result.state is ServingState.NOT_VERIFIED and "add sni=NAME" in (result.reason or "")
    no_time = ServingRequest("t", (endpoint,), "new", "a.example.com", 0)
    result = verify_endpoint(endpoint, no_time, probe_once=never)
    assert result.state is ServingState.NOT_VERIFIED and "soft time limit" in (result.reason or "")


def test_requests_are_verified_concurrently_and_a_defect_stays_in_its_own_result() -> None:
    barrier = threading.Barrier(3, timeout=5)
    endpoints = [Endpoint("a", 1), Endpoint("b", 2), Endpoint("c", 3)]

    def verify(endpoint: Endpoint, request: ServingRequest) -> EndpointResult:
        barrier.wait()  # all three at once, or this times out
        if endpoint.host == "c":
            raise RuntimeError("boom")
        return EndpointResult(str(endpoint), ServingState.VERIFIED, 0.1, 1)

    requests = [
        ServingRequest("t1", tuple(endpoints[:2]), "x", "s.example.com", 5),
        ServingRequest("t2", (endpoints[2],), "x", "s.example.com", 5),
    ]
    results = verify_requests(requests, verify=verify)
    assert [r.state for r in results["t1"]] == [ServingState.VERIFIED, ServingState.VERIFIED]
    (broken,) = results["t2"]
    assert broken.state is ServingState.NOT_VERIFIED
    assert "internal error (RuntimeError)" in (broken.reason or "")
