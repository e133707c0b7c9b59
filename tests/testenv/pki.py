"""Certificates for the test clusters: a CA per cluster, serving and client certificates.

ECDSA P-256 keys throughout: generating them is instant, and kube-apiserver, etcd, OpenSSL
and the Python client accept them.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=7)
# Tolerate small clock differences between this process and the servers.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertAndKey:
    """A PEM certificate and its PEM private key (the key never shows in repr)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialize a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialize the public half of a key as SubjectPublicKeyInfo PEM."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


class CertificateAuthority:
    """A self-signed CA that issues serving and client certificates."""

    def __init__(self, common_name: str) -> None:
        self._key = new_private_key()
        now = datetime.datetime.now(datetime.UTC)
        subject = _name(common_name)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self._cert.subject.rfc4514_string()!r})"

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate in PEM."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue_serving(
        self,
        common_name: str,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
    ) -> CertAndKey:
        """Issue a TLS server certificate for the given DNS names and IP addresses."""
        sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        return self._issue(
            _name(common_name),
            [ExtendedKeyUsageOID.SERVER_AUTH],
            x509.SubjectAlternativeName(sans),
        )

    def issue_client(self, common_name: str, organizations: Sequence[str] = ()) -> CertAndKey:
        """Issue a TLS client certificate; Kubernetes reads CN as user and O as groups."""
        return self._issue(
            _name(common_name, organizations), [ExtendedKeyUsageOID.CLIENT_AUTH], None
        )

    def _issue(
        self,
        subject: x509.Name,
        usages: list[x509.ObjectIdentifier],
        sans: x509.SubjectAlternativeName | None,
    ) -> CertAndKey:
        key = new_private_key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans is not None:
            builder = builder.add_extension(sans, critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return CertAndKey(cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key))
