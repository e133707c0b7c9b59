"""What is deployed where: classify one live Secret against a distribution's certificate (pure).

An audit reads each target's Secret once and says what it holds, compared with the
certificate revision the audit run pinned and that certificate's other revisions:

=============  ====================================================================
``current``    our unedited write of the pinned revision (or of a newer one: the
               certificate was renewed while the audit ran)
``outdated``   our unedited write of an older revision of this certificate (a renewal
               not executed here yet)
``drifted``    carries our managed-by label, but its data changed since our write (the
               ``content-sha256`` we wrote with it no longer matches, or is gone), its
               type is not ``kubernetes.io/tls``, or it holds a certificate that is no
               revision of this one (another distribution wrote the same Secret)
``unmanaged``  exists without our managed-by label: CertAutoPilot did not write it
``missing``    does not exist
=============  ====================================================================

A target whose Secret could not be read at all is ``unreachable`` or ``forbidden`` (or
``failed`` with the reason, e.g. a template that no longer renders): :func:`failure_state`.

"Our write" is recognised as :mod:`worker.kube.deploy` recognises it for rollback snapshots:
the managed-by label plus a ``certautopilot.io/content-sha256`` annotation that still matches
the data. Which certificate it holds is read from the data itself (the first certificate of
``tls.crt``), never from the annotations, which anyone can edit without touching the hash.
No key material is read: the audit needs neither the private key nor ``tls.key``.

Urgency (:func:`urgency`) orders a report for people: expired first, then expiring within the
warning window, drifted, missing, unreadable, outdated, unmanaged, current.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from worker.core.bundle import BundleError, CertificateInfo, describe_certificates
from worker.core.secret import (
    ANN_CONTENT_SHA256,
    ANN_DISTRIBUTION_ID,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    TLS_SECRET_TYPE,
    content_sha256,
    decoded_data,
    is_managed,
)

__all__ = [
    "AUDIT_STATES",
    "CURRENT",
    "DEFAULT_WARN_DAYS",
    "DRIFTED",
    "FAILED",
    "FORBIDDEN",
    "MISSING",
    "OUTDATED",
    "UNMANAGED",
    "UNREACHABLE",
    "AuditFinding",
    "DeployedLeaf",
    "classify_secret",
    "days_left",
    "failure_state",
    "urgency",
]

CURRENT: Final = "current"
OUTDATED: Final = "outdated"
DRIFTED: Final = "drifted"
UNMANAGED: Final = "unmanaged"
MISSING: Final = "missing"
UNREACHABLE: Final = "unreachable"
FORBIDDEN: Final = "forbidden"
FAILED: Final = "failed"

#: What a read Secret can be (each is a result status of an audit run).
AUDIT_STATES: Final = (CURRENT, OUTDATED, DRIFTED, UNMANAGED, MISSING)

#: A deployed certificate expiring within this many days counts as "expiring" (urgency).
DEFAULT_WARN_DAYS: Final = 30

# Reason codes (worker.kube.errors) that mean "could not reach or talk to the API server".
_UNREACHABLE_REASONS = frozenset(
    {
        "transport_error",
        "unreachable",
        "timeout",
        "tls_verification_failed",
        "throttled",
        "server_error",
    }
)
_FORBIDDEN_REASONS = frozenset({"forbidden", "unauthorized"})

_SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class DeployedLeaf:
    """The first certificate of the live ``tls.crt``: what consumers of the Secret serve."""

    serial_hex: str
    not_after: datetime
    sha256_fingerprint: str
    subject: str

    @classmethod
    def of(cls, info: CertificateInfo) -> DeployedLeaf:
        """The fields an audit reports of a described certificate."""
        return cls(
            serial_hex=info.serial_hex,
            not_after=info.not_after.astimezone(UTC),
            sha256_fingerprint=info.sha256_fingerprint,
            subject=info.subject,
        )


@dataclass(frozen=True)
class AuditFinding:
    """What one target's Secret holds, compared with the audited certificate."""

    state: str
    """One of :data:`AUDIT_STATES`."""
    detail: str
    """One sentence for people: why this state."""
    leaf: DeployedLeaf | None = None
    """The deployed leaf, whenever ``tls.crt`` holds a readable certificate (any state)."""
    revision: int | None = None
    """The revision of the audited certificate the Secret holds, when it holds one."""
    written_by: str | None = None
    """The ``certautopilot.io/distribution-id`` annotation, when present."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored on the result row (no key material: none is read)."""
        return {
            "state": self.state,
            "detail": self.detail,
            "fingerprint": self.leaf.sha256_fingerprint if self.leaf else None,
            "subject": self.leaf.subject if self.leaf else None,
            "revision": self.revision,
            "written_by": self.written_by,
        }


def _deployed_leaf(data: Mapping[str, bytes]) -> tuple[DeployedLeaf | None, str | None]:
    """The first certificate of ``tls.crt``, or None with why it cannot be read."""
    pem = data.get("tls.crt")
    if not pem:
        return None, "has no tls.crt"
    try:
        return DeployedLeaf.of(describe_certificates(pem)[0]), None
    except (BundleError, ValueError):
        return None, f"has a tls.crt that is not a PEM certificate ({len(pem)} bytes)"


def _annotation(live: Mapping[str, Any], key: str) -> str | None:
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(key)
    return None if value is None else str(value)


def classify_secret(
    live: Mapping[str, Any] | None,
    *,
    revisions: Mapping[str, int],
    pinned_revision: int,
) -> AuditFinding:
    """Classify the live Secret (None: it does not exist) against the audited certificate.

    ``revisions`` maps the SHA-256 fingerprint of every revision of the certificate to its
    number; ``pinned_revision`` is the number the audit run compares with.
    """
    if live is None:
        return AuditFinding(MISSING, "the Secret does not exist")
    data = decoded_data(live)
    leaf, unreadable = _deployed_leaf(data)
    written_by = _annotation(live, ANN_DISTRIBUTION_ID)

    def finding(state: str, detail: str, revision: int | None = None) -> AuditFinding:
        return AuditFinding(state, detail, leaf, revision, written_by)

    if not is_managed(live):
        return finding(
            UNMANAGED,
            f"it has no {MANAGED_BY_LABEL}: {MANAGED_BY_VALUE} label: CertAutoPilot did not "
            "write it",
        )
    if live.get("type") != TLS_SECRET_TYPE:
        shown = live.get("type") or "(none)"
        return finding(DRIFTED, f"its type is {shown}, not {TLS_SECRET_TYPE}")
    written_hash = _annotation(live, ANN_CONTENT_SHA256)
    if written_hash is None:
        return finding(
            DRIFTED,
            f"it carries our label but no {ANN_CONTENT_SHA256} annotation: written by hand, "
            "or our annotations were removed",
        )
    if written_hash != content_sha256(data):
        return finding(DRIFTED, "its data changed since CertAutoPilot wrote it")
    if leaf is None:
        # Only a write whose hash was forged along with the data reaches this.
        return finding(DRIFTED, f"it {unreadable}")
    number = revisions.get(leaf.sha256_fingerprint)
    if number is None:
        return finding(
            DRIFTED,
            f"it holds certificate {leaf.sha256_fingerprint[:16]}… (serial {leaf.serial_hex}), "
            "which is no revision of this certificate"
            + (f" (written by distribution {written_by})" if written_by else ""),
        )
    if number < pinned_revision:
        return finding(
            OUTDATED,
            f"it holds revision {number}; the certificate is at revision {pinned_revision} "
            "(execute the distribution to deploy it)",
            number,
        )
    if number > pinned_revision:
        return finding(
            CURRENT,
            f"it holds revision {number}, newer than revision {pinned_revision} this audit "
            "compared with (renewed and deployed while the audit ran)",
            number,
        )
    return finding(CURRENT, f"it holds revision {number}, the certificate's current one", number)


def failure_state(reason: str | None) -> str:
    """The audit state of a target whose Secret could not be read, from its reason code."""
    if reason in _UNREACHABLE_REASONS:
        return UNREACHABLE
    if reason in _FORBIDDEN_REASONS:
        return FORBIDDEN
    return FAILED


def days_left(not_after: datetime, at: datetime) -> int:
    """Whole days from ``at`` until ``not_after``, rounded down (negative once expired)."""
    if not_after.tzinfo is None or at.tzinfo is None:
        raise ValueError("days_left needs timezone-aware datetimes")
    return math.floor((not_after - at).total_seconds() / _SECONDS_PER_DAY)


# Ranks after the two time-based ones (expired = 0, expiring = 1).
_STATE_RANK: Final = {
    DRIFTED: 2,
    MISSING: 3,
    UNREACHABLE: 4,
    FORBIDDEN: 4,
    FAILED: 4,
    OUTDATED: 5,
    UNMANAGED: 6,
    CURRENT: 7,
}


def urgency(
    state: str,
    not_after: datetime | None,
    at: datetime,
    *,
    warn_days: int = DEFAULT_WARN_DAYS,
) -> tuple[int, float]:
    """A sort key, most urgent first: (rank, seconds left of the deployed leaf).

    Expired leaves come first whatever their state, then those expiring within ``warn_days``,
    then by state: drifted, missing, unreadable (unreachable/forbidden/failed), outdated,
    unmanaged, current. Within a rank the leaf closest to expiry (or past it) comes first;
    a target without a deployed leaf sorts after those with one.
    """
    if warn_days < 0:
        raise ValueError(f"warn_days must be 0 or more, not {warn_days}")
    if state not in _STATE_RANK:
        raise ValueError(f"unknown audit state {state!r}")
    left = math.inf if not_after is None else (not_after - at).total_seconds()
    if left <= 0:
        return 0, left
    if left < warn_days * _SECONDS_PER_DAY:
        return 1, left
    return _STATE_RANK[state], left
