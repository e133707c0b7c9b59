"""Verify serving: which endpoints to probe, how often, and how to say what they served (pure).

After an execute wrote the Secret (or found it unchanged), the worker can probe a target's
endpoints with a TLS handshake until each presents the new leaf (SHA-256 fingerprints
compared) or the target's deadline passes. This module owns everything about that which is
not I/O: parsing and validating the endpoints an operator types (``host:port[,sni=NAME]``),
the deadline (``120``, ``90s``, ``2m``), the default SNI, which addresses a "public only"
target refuses, the backoff between attempts, the per-endpoint outcome and its wording, and
the target's overall verdict. The handshake itself is :mod:`worker.app.serving`.

Wording (``runs show``, ``--output json``, the webhook payload all carry these lines)::

    verified after 3 s
    still serving serial 1a2b (not-after 2027-01-01 00:00Z) after 5 s
    unreachable: connection refused (after 5 s, 4 attempts)
    serving the new certificate after 3 s, but its chain does not validate: <why>
    not verified: <why>
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "DEFAULT_DEADLINE_SECONDS",
    "HANDSHAKE_TIMEOUT_SECONDS",
    "MAX_DEADLINE_SECONDS",
    "MAX_ENDPOINTS",
    "OWN_CHAIN",
    "REQUIRE_SERVING_OPTION",
    "Endpoint",
    "EndpointResult",
    "ServingConfigError",
    "ServingState",
    "address_problem",
    "default_sni",
    "delay_after",
    "describe_deadline",
    "not_serving_message",
    "parse_deadline",
    "parse_endpoint",
    "parse_endpoints",
    "serving_lines",
    "summarise",
    "verification_window",
]

#: Default per-target deadline: kubelet's sync (~60 s, 62-73 s measured on a real node) plus
#: a controller's reload, with margin.
DEFAULT_DEADLINE_SECONDS = 120
#: The longest deadline a target may ask for: the verification runs inside the per-target
#: task, whose soft time limit (600 s by default) also holds the writes.
MAX_DEADLINE_SECONDS = 600
#: Endpoints one target may name (each costs a handshake per attempt).
MAX_ENDPOINTS = 8
#: One attempt's connect + handshake timeout (shortened to what is left of the deadline).
HANDSHAKE_TIMEOUT_SECONDS = 5.0
#: The run option (pinned at enqueue from the group's ``--require-serving``) under which a
#: target whose endpoints do not serve the new certificate is a failed target.
REQUIRE_SERVING_OPTION = "require_serving"
#: The CA choice "trust the certificate's own chain and CA" (instead of a PEM bundle).
OWN_CHAIN = "own-chain"

#: Backoff between attempts: 0.5 s doubling up to this (the deadline cuts the last wait).
_FIRST_DELAY = 0.5
_MAX_DELAY = 10.0

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_DEADLINE = re.compile(r"^\s*([0-9]{1,6})\s*(s|m)?\s*$")


class ServingConfigError(ValueError):
    """A verify-serving setting that cannot be used; the message names it and the fix."""


class ServingState(StrEnum):
    """What an endpoint (and, summarised, a target) ended with."""

    VERIFIED = "verified"
    """The endpoint presented the new leaf (and, with a CA set, its chain validated)."""
    STALE = "stale"
    """The endpoint answered but still presented another certificate at the deadline."""
    CHAIN_INVALID = "chain_invalid"
    """The new leaf is served, but the chain does not validate against the configured CA."""
    UNREACHABLE = "unreachable"
    """No handshake completed (refused, timed out, TLS error, refused address)."""
    NOT_VERIFIED = "not_verified"
    """The probe could not run (no SNI to send, no time left before the task's time limit)."""


#: Which state a target's summary shows when its endpoints disagree (the first found wins).
_SUMMARY_ORDER = (
    ServingState.STALE,
    ServingState.CHAIN_INVALID,
    ServingState.UNREACHABLE,
    ServingState.NOT_VERIFIED,
)


@dataclass(frozen=True)
class Endpoint:
    """One endpoint to probe: host (a DNS name or an IP address), port, and an optional SNI."""

    host: str
    port: int
    sni: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address if self.sni is None else f"{self.address},sni={self.sni}"

    @property
    def is_ip(self) -> bool:
        """Whether the host is an IP address literal (nothing to resolve)."""
        return _ip(self.host) is not None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def address_problem(address: str) -> str | None:
    """Why a "public only" target may not probe ``address`` (an IP literal), or None.

    Refused: loopback, private (RFC 1918, unique-local), link-local (including the cloud
    metadata address 169.254.169.254), shared CGNAT space, multicast, unspecified and reserved
    addresses: anything that is not globally routable.
    """
    ip = _ip(address)
    if ip is None:
        raise ServingConfigError(f"{address!r} is not an IP address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flagged in (
        ("a loopback", ip.is_loopback),
        ("a link-local", ip.is_link_local),
        ("an unspecified", ip.is_unspecified),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),
        ("a reserved", ip.is_reserved),
    ):
        if flagged:
            return f"{ip} is {kind} address"
    if not ip.is_global:
        return f"{ip} is not a globally routable address"
    return None


def _hostname_problem(name: str) -> str | None:
    if len(name) > 253:
        return f"{len(name)} characters (at most 253)"
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            return (
                f"label {label!r} is not a DNS label (letters, digits and '-', 1-63 characters, "
                "not starting or ending with '-')"
            )
    if labels[-1].isdigit():
        return "it looks like an IP address but is not a valid one"
    return None


def parse_endpoint(text: str, *, public_only: bool = False) -> Endpoint:
    """Parse ``host:port[,sni=NAME]``; ServingConfigError names what is wrong and the fix."""
    raw = text.strip()
    shown = repr(text)
    if not raw:
        raise ServingConfigError("empty endpoint: give host:port, e.g. ingress.example.com:443")
    if "://" in raw or "/" in raw:
        raise ServingConfigError(
            f"endpoint {shown}: give host:port (e.g. shop.example.com:443), not a URL or a path"
        )
    address, *options = (part.strip() for part in raw.split(","))
    sni: str | None = None
    for option in options:
        key, sep, value = option.partition("=")
        if key.strip().lower() != "sni" or not sep:
            raise ServingConfigError(
                f"endpoint {shown}: unknown option {option!r}; the only option is sni=NAME "
                "(host:port,sni=shop.example.com)"
            )
        if sni is not None:
            raise ServingConfigError(f"endpoint {shown}: sni= given twice")
        sni = value.strip().lower().rstrip(".")
        if _ip(sni) is not None or sni.startswith("*."):
            raise ServingConfigError(
                f"endpoint {shown}: sni={value.strip()!r} must be a host name (not an IP address "
                "or a wildcard): the name a client asks for, e.g. sni=shop.example.com"
            )
        problem = _hostname_problem(sni)
        if problem:
            raise ServingConfigError(f"endpoint {shown}: sni {value.strip()!r}: {problem}")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ServingConfigError(
                f"endpoint {shown}: an IPv6 address is written [address]:port, "
                "e.g. [2001:db8::1]:443"
            )
        port_text = rest[1:]
        if not isinstance(_ip(host), ipaddress.IPv6Address):
            raise ServingConfigError(
                f"endpoint {shown}: {host!r} in brackets is not an IPv6 address"
            )
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise ServingConfigError(
                f"endpoint {shown}: give host:port with the port, e.g. {address or 'host'}:443"
            )
        if ":" in host:
            raise ServingConfigError(
                f"endpoint {shown}: an IPv6 address goes in brackets: [{host}]:{port_text}"
            )
    if not _PORT.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise ServingConfigError(
            f"endpoint {shown}: port {port_text!r} is not a port number from 1 to 65535"
        )
    host = host.lower().rstrip(".") if _ip(host) is None else str(_ip(host))
    if _ip(host) is None:
        problem = _hostname_problem(host)
        if problem:
            raise ServingConfigError(f"endpoint {shown}: host {host!r}: {problem}")
    elif public_only:
        problem = address_problem(host)
        if problem:
            raise ServingConfigError(
                f"endpoint {shown}: {problem}, and the target requires public endpoints "
                "(--serving-public-only); use a public address, or save the target without "
                "--serving-public-only"
            )
    return Endpoint(host=host, port=int(port_text), sni=sni)


def parse_endpoints(texts: Iterable[str], *, public_only: bool = False) -> list[Endpoint]:
    """Parse a target's endpoints; at most MAX_ENDPOINTS, each once."""
    endpoints = [parse_endpoint(text, public_only=public_only) for text in texts]
    if len(endpoints) > MAX_ENDPOINTS:
        raise ServingConfigError(
            f"{len(endpoints)} endpoints to verify; a target may name at most {MAX_ENDPOINTS} "
            "(each costs a TLS handshake per attempt)"
        )
    seen: set[str] = set()
    for endpoint in endpoints:
        if str(endpoint) in seen:
            raise ServingConfigError(f"endpoint {str(endpoint)!r} is listed twice")
        seen.add(str(endpoint))
    return endpoints


def parse_deadline(value: str | int) -> int:
    """Seconds from ``120``, ``90s`` or ``2m``, between 1 and MAX_DEADLINE_SECONDS."""
    match = _DEADLINE.match(str(value))
    if match is None:
        raise ServingConfigError(
            f"serving deadline {value!r}: give whole seconds or minutes, e.g. 120, 90s or 2m"
        )
    seconds = int(match.group(1)) * (60 if match.group(2) == "m" else 1)
    if not 1 <= seconds <= MAX_DEADLINE_SECONDS:
        raise ServingConfigError(
            f"serving deadline {value!r} is {seconds} s; it must be from 1 s to "
            f"{MAX_DEADLINE_SECONDS} s (the verification runs inside the per-target task)"
        )
    return seconds


def describe_deadline(seconds: int | None) -> str:
    """The deadline as shown by ``targets show`` (the default marked)."""
    if seconds is None:
        return f"{DEFAULT_DEADLINE_SECONDS} s (default)"
    return f"{seconds} s"


def default_sni(common_name: str | None, sans: Sequence[str]) -> str | None:
    """The SNI sent when the endpoint names none: the CN, else the first DNS SAN; never a
    wildcard or an IP address (None then: the endpoint needs ``sni=``)."""
    for name in (common_name, *sans):
        if not name:
            continue
        candidate = name.strip().lower().rstrip(".")
        if candidate.startswith("*") or _ip(candidate) is not None:
            continue
        if _hostname_problem(candidate) is None:
            return candidate
    return None


def delay_after(attempt: int) -> float:
    """Seconds to wait after attempt ``attempt`` (1-based): 0.5, 1, 2, 4, 8, then 10 each."""
    if attempt < 1:
        raise ValueError("attempts count from 1")
    return min(_MAX_DELAY, _FIRST_DELAY * float(2 ** min(attempt - 1, 16)))


def _seconds(value: float) -> str:
    # Sub-second verdicts are common (a consumer that already reloaded): keep them readable.
    if value >= 10:
        return f"{value:.0f} s"
    return f"{value:.1f} s" if value >= 1 else f"{value:.2f} s"


@dataclass(frozen=True)
class EndpointResult:
    """How one endpoint ended; ``line()`` says it in the documented words."""

    endpoint: str
    state: ServingState
    seconds: float
    """From the first attempt to the outcome."""
    attempts: int
    serial: str | None = None
    """What the endpoint presented last (lower-case hex), when a handshake completed."""
    not_after: datetime | None = None
    reason: str | None = None
    """Why unreachable / not verified, or why the chain does not validate."""
    chain: str | None = None
    """With a CA configured: "valid" or "invalid"; None without one."""

    def line(self) -> str:
        """The outcome in words, without the endpoint."""
        took = _seconds(self.seconds)
        if self.state is ServingState.VERIFIED:
            chain = "; chain valid" if self.chain == "valid" else ""
            return f"verified after {took}{chain}"
        if self.state is ServingState.STALE:
            until = f"{self.not_after:%Y-%m-%d %H:%M}Z" if self.not_after else "unknown"
            return f"still serving serial {self.serial} (not-after {until}) after {took}"
        if self.state is ServingState.CHAIN_INVALID:
            return (
                f"serving the new certificate after {took}, but its chain does not validate: "
                f"{self.reason}"
            )
        if self.state is ServingState.UNREACHABLE:
            tries = f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}"
            return f"unreachable: {self.reason} (after {took}, {tries})"
        return f"not verified: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON stored on the result (and shown by ``--output json``)."""
        return {
            "endpoint": self.endpoint,
            "state": self.state.value,
            "seconds": round(self.seconds, 3),
            "attempts": self.attempts,
            "serial": self.serial,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "reason": self.reason,
            "chain": self.chain,
            "line": self.line(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EndpointResult:
        """The inverse of to_dict (the line is recomputed)."""
        not_after = data.get("not_after")
        return cls(
            endpoint=str(data["endpoint"]),
            state=ServingState(data["state"]),
            seconds=float(data["seconds"]),
            attempts=int(data["attempts"]),
            serial=data.get("serial"),
            not_after=datetime.fromisoformat(not_after) if not_after else None,
            reason=data.get("reason"),
            chain=data.get("chain"),
        )


def summarise(results: Sequence[EndpointResult]) -> ServingState:
    """A target's verdict: verified only when every endpoint is; otherwise the first of
    stale, chain_invalid, unreachable, not_verified found among them."""
    if not results:
        raise ValueError("a target that verifies serving names at least one endpoint")
    states = {result.state for result in results}
    for state in _SUMMARY_ORDER:
        if state in states:
            return state
    return ServingState.VERIFIED


def serving_lines(results: Sequence[EndpointResult]) -> list[str]:
    """One ``serving <endpoint>: <line>`` per endpoint (what `runs show` prints)."""
    return [f"serving {result.endpoint}: {result.line()}" for result in results]


def verification_window(configured: float, *, seconds_left: float) -> tuple[float, bool]:
    """How long a target's verification may run: its deadline, cut to what is left before the
    task must record (its soft time limit minus the recording reserve); and whether it was cut.
    """
    window = max(0.0, min(float(configured), seconds_left))
    return window, window < configured


def not_serving_message(written: str, results: Sequence[EndpointResult]) -> str:
    """The error message of a target failed by ``--require-serving`` (the write stays done)."""
    return (
        f"the Secret was {written.replace('_', ' ')}, but the new certificate is not served "
        "everywhere (the group requires serving): " + "; ".join(serving_lines(results))
    )
