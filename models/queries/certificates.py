"""Certificates: store a validated bundle (private key sealed), renew it in place, read it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.base import new_id
from models.entities import Certificate, CertificateRevision
from models.errors import NotFoundError
from models.queries._common import get_row
from models.sealing import Sealer

__all__ = [
    "BundleLike",
    "CertificateFacts",
    "current_revision",
    "get_certificate",
    "get_revision",
    "list_certificates",
    "replace_certificate",
    "reveal_private_key",
    "reveal_revision_key",
    "revision_numbers",
    "store_certificate",
]

_PRIVATE_KEY = {"table": Certificate.__tablename__, "purpose": "private_key"}


class CertificateFacts(Protocol):
    """The parsed leaf fields stored with a certificate (worker.core.bundle.CertificateInfo)."""

    @property
    def common_name(self) -> str | None: ...
    @property
    def sans(self) -> Sequence[str]: ...
    @property
    def serial_hex(self) -> str: ...
    @property
    def issuer(self) -> str: ...
    @property
    def not_before(self) -> datetime: ...
    @property
    def not_after(self) -> datetime: ...
    @property
    def sha256_fingerprint(self) -> str: ...


class BundleLike(Protocol):
    """A validated bundle (worker.core.bundle.TlsBundle): leaf facts, PEMs and the private key."""

    @property
    def leaf(self) -> CertificateFacts: ...
    @property
    def leaf_pem(self) -> bytes: ...
    @property
    def chain_pems(self) -> Sequence[bytes]: ...
    @property
    def key_pem(self) -> bytes: ...
    @property
    def ca_pem(self) -> bytes | None: ...


def _apply_bundle(certificate: Certificate, sealer: Sealer, bundle: BundleLike) -> None:
    leaf = bundle.leaf
    certificate.common_name = leaf.common_name
    certificate.sans = list(leaf.sans)
    certificate.serial_hex = leaf.serial_hex
    certificate.issuer = leaf.issuer
    certificate.not_before = leaf.not_before
    certificate.not_after = leaf.not_after
    certificate.sha256_fingerprint = leaf.sha256_fingerprint
    certificate.leaf_pem = bundle.leaf_pem.decode("ascii")
    certificate.chain_pem = b"".join(bundle.chain_pems).decode("ascii")
    certificate.ca_pem = bundle.ca_pem.decode("ascii") if bundle.ca_pem is not None else None
    certificate.private_key = sealer.seal(bundle.key_pem, row_id=certificate.id, **_PRIVATE_KEY)


def store_certificate(
    session: Session, sealer: Sealer, bundle: BundleLike, *, certificate_id: str | None = None
) -> Certificate:
    """Insert a certificate from a validated bundle; the private key is sealed."""
    certificate = Certificate(id=certificate_id or new_id())
    _apply_bundle(certificate, sealer, bundle)
    session.add(certificate)
    session.flush()
    _add_revision(session, certificate)
    return certificate


def replace_certificate(
    session: Session, sealer: Sealer, certificate_id: str, bundle: BundleLike
) -> Certificate:
    """Replace a certificate's content with a renewed bundle, keeping its id (renewal)."""
    certificate = get_certificate(session, certificate_id)
    _apply_bundle(certificate, sealer, bundle)
    session.flush()
    _add_revision(session, certificate)
    return certificate


def _add_revision(session: Session, certificate: Certificate) -> CertificateRevision:
    """Record the certificate's content as its next revision (runs enqueued from now on pin it).

    Two renewals racing for the same number: the unique (certificate_id, number) constraint
    refuses the second transaction, whose caller retries or reports it.
    """
    latest = session.scalar(
        select(func.max(CertificateRevision.number)).where(
            CertificateRevision.certificate_id == certificate.id
        )
    )
    revision = CertificateRevision(
        id=new_id(),
        certificate_id=certificate.id,
        number=(latest or 0) + 1,
        common_name=certificate.common_name,
        sans=list(certificate.sans),
        serial_hex=certificate.serial_hex,
        issuer=certificate.issuer,
        not_before=certificate.not_before,
        not_after=certificate.not_after,
        sha256_fingerprint=certificate.sha256_fingerprint,
        leaf_pem=certificate.leaf_pem,
        chain_pem=certificate.chain_pem,
        ca_pem=certificate.ca_pem,
        private_key=certificate.private_key,
    )
    session.add(revision)
    session.flush()
    return revision


def current_revision(session: Session, certificate_id: str) -> CertificateRevision:
    """The certificate's newest revision (what a run enqueued now pins), or NotFoundError."""
    revision = session.scalars(
        select(CertificateRevision)
        .where(CertificateRevision.certificate_id == certificate_id)
        .order_by(CertificateRevision.number.desc())
        .limit(1)
    ).first()
    if revision is None:
        get_certificate(session, certificate_id)  # NotFoundError names the certificate
        raise NotFoundError("certificate revision of certificate", certificate_id)
    return revision


def revision_numbers(session: Session, certificate_id: str) -> dict[str, int]:
    """Every revision of the certificate as {SHA-256 fingerprint: number} (what an audit
    compares a deployed leaf with); one statement, no key envelopes loaded."""
    rows = session.execute(
        select(CertificateRevision.sha256_fingerprint, CertificateRevision.number).where(
            CertificateRevision.certificate_id == certificate_id
        )
    )
    return {fingerprint: number for fingerprint, number in rows}


def get_revision(session: Session, revision_id: str) -> CertificateRevision:
    """The certificate revision with this id, or NotFoundError."""
    return get_row(session, CertificateRevision, revision_id, "certificate revision")


def load_revisions(session: Session, revision_ids: Sequence[str]) -> list[CertificateRevision]:
    """The revisions with these ids, in one query (later get_revision calls of the session
    find them without another)."""
    if not revision_ids:
        return []
    query = select(CertificateRevision).where(CertificateRevision.id.in_(list(revision_ids)))
    return list(session.scalars(query))


def get_certificate(session: Session, certificate_id: str) -> Certificate:
    """The certificate with this id, or NotFoundError."""
    return get_row(session, Certificate, certificate_id, "certificate")


def list_certificates(session: Session) -> list[Certificate]:
    """All certificates, oldest first."""
    return list(session.scalars(select(Certificate).order_by(Certificate.created_at)))


def certificate_ids_with_fingerprint(session: Session, sha256_fingerprint: str) -> list[str]:
    """Ids of the certificates whose current leaf has this SHA-256 fingerprint, oldest first."""
    return list(
        session.scalars(
            select(Certificate.id)
            .where(Certificate.sha256_fingerprint == sha256_fingerprint)
            .order_by(Certificate.created_at)
        )
    )


def reveal_private_key(session: Session, sealer: Sealer, certificate_id: str) -> bytes:
    """The certificate's private key PEM, decrypted (only for building the Secret)."""
    certificate = get_certificate(session, certificate_id)
    return sealer.unseal(certificate.private_key, row_id=certificate.id, **_PRIVATE_KEY)


def reveal_revision_key(session: Session, sealer: Sealer, revision_id: str) -> bytes:
    """The private key PEM of one certificate revision, decrypted (only for building the Secret).

    The envelope is sealed for the certificate (see CertificateRevision), so a key copied into
    another certificate's revision does not open.
    """
    revision = get_revision(session, revision_id)
    return sealer.unseal(revision.private_key, row_id=revision.certificate_id, **_PRIVATE_KEY)
