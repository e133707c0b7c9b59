"""Test helper: generate CA -> intermediates -> leaf certificate chains and private keys.

Every test that needs real X.509 material imports this module instead of shipping fixture files,
so certificates never expire in the repository and every key type is one argument away.

Typical use::

    chain = make_chain(cn="app.example.com", key_type="rsa2048", intermediates=2)
    chain.leaf_pem        # the leaf certificate, PEM
    chain.chain_pem       # the intermediates, leaf -> root-ward, PEM (no root)
    chain.root_pem        # the self-signed root, PEM
    chain.key_pem         # the leaf's private key, unencrypted PKCS#8 PEM
    chain.fullchain_pem   # leaf + intermediates, what tls.crt should hold
    key_to_pem(chain.leaf_key, "pkcs1")                  # RSA traditional format
    key_to_pem(chain.leaf_key, "sec1")                   # EC traditional format
    key_to_pem(chain.leaf_key, "pkcs8", passphrase=b"s") # ENCRYPTED PRIVATE KEY

Keys are cached per (key type, slot) because RSA generation is slow and hypothesis-driven tests
build many chains; certificates are always fresh (new serial numbers), so two calls never
return equal certificates.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec256", "ec384", "ec521", "rsa2048", "rsa1024", "ed25519", "ed448", "dsa2048"]
"""The bundle rules accept ec256, ec384, rsa2048, ed25519; the others exist to test refusals."""

KeyFormat = Literal["pkcs8", "pkcs1", "sec1", "openssh"]
"""pkcs1 is the traditional RSA format and sec1 the traditional EC format ("... PRIVATE KEY")."""

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

SUPPORTED_KEY_TYPES: tuple[KeyType, ...] = ("ec256", "ec384", "rsa2048", "ed25519")

LEAF_LIFETIME = dt.timedelta(days=90)
"""Default leaf validity: from one day before `now`, 90 days long (like Let's Encrypt)."""


def utcnow() -> dt.datetime:
    """The current time, aware UTC (the default centre of generated validity windows)."""
    return dt.datetime.now(dt.UTC)


def _window(
    now: dt.datetime | None, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    now = now or utcnow()
    start = not_before or now - dt.timedelta(days=1)
    return start, not_after or start + LEAF_LIFETIME


def generate_key(key_type: KeyType) -> PrivateKey:
    """A brand-new private key of the given type (never cached)."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ec521":
        return ec.generate_private_key(ec.SECP521R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - to test refusal
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if key_type == "dsa2048":
        return dsa.generate_private_key(key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


@functools.cache
def cached_key(key_type: KeyType, slot: int = 0) -> PrivateKey:
    """A private key reused across calls with the same (key_type, slot): fast, but shared."""
    return generate_key(key_type)


def key_to_pem(
    key: PrivateKey, fmt: KeyFormat = "pkcs8", *, passphrase: bytes | None = None
) -> bytes:
    """Serialise a private key as PEM in the given format, encrypted when a passphrase is given."""
    encoding = serialization.Encoding.PEM
    if fmt == "pkcs8":
        private_format = serialization.PrivateFormat.PKCS8
    elif fmt in ("pkcs1", "sec1"):
        expected = rsa.RSAPrivateKey if fmt == "pkcs1" else ec.EllipticCurvePrivateKey
        if not isinstance(key, expected):
            raise ValueError(f"{fmt} applies to {expected.__name__} only")
        private_format = serialization.PrivateFormat.TraditionalOpenSSL
    elif fmt == "openssh":
        private_format = serialization.PrivateFormat.OpenSSH
    else:
        raise ValueError(f"unknown key format {fmt!r}")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(encoding, private_format, encryption)


def key_to_der(key: PrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 DER (to test that DER input is refused)."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: PrivateKey) -> bytes:
    """The public half of a key as a "PUBLIC KEY" PEM block."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """One certificate as a PEM block ending with a newline."""
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_to_der(cert: x509.Certificate) -> bytes:
    """One certificate as DER."""
    return cert.public_bytes(serialization.Encoding.DER)


def _signature_hash(issuer_key: PrivateKey) -> hashes.HashAlgorithm | None:
    # Ed25519/Ed448 sign without a separate digest; the API wants None for them.
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey) and issuer_key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _name(cn: str | None, org: str = "CertAutoPilot Tests") -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if cn is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


def _general_names(sans: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return names


def issue_certificate(
    *,
    subject: x509.Name,
    public_key: PrivateKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    is_ca: bool,
    not_before: dt.datetime,
    not_after: dt.datetime,
    sans: Sequence[str] = (),
    path_length: int | None = None,
) -> x509.Certificate:
    """Sign one certificate: the building block of make_chain, also for odd test cases."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key.public_key()), critical=False
        )
    )
    if is_ca:
        builder = builder.add_extension(
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
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_general_names(sans)), critical=False
        )
    return builder.sign(issuer_key, _signature_hash(issuer_key))  # type: ignore[arg-type]


def _leaf(
    cn: str | None,
    sans: Sequence[str] | None,
    key: PrivateKey,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """An end-entity certificate; `sans` defaults to [cn]."""
    return issue_certificate(
        subject=_name(cn),
        public_key=key,
        issuer=issuer.subject,
        issuer_key=issuer_key,
        is_ca=False,
        not_before=not_before,
        not_after=not_after,
        sans=list(sans) if sans is not None else ([cn] if cn else []),
    )


@dataclass(frozen=True)
class Chain:
    """A root, its intermediates and a leaf, with their keys; PEM accessors return bytes."""

    leaf: x509.Certificate
    leaf_key: PrivateKey
    intermediates: tuple[x509.Certificate, ...]  # leaf -> root-ward: intermediates[0] issued leaf
    intermediate_keys: tuple[PrivateKey, ...]
    root: x509.Certificate
    root_key: PrivateKey

    @property
    def leaf_pem(self) -> bytes:
        """The leaf certificate alone."""
        return cert_to_pem(self.leaf)

    @property
    def chain_pem(self) -> bytes:
        """The intermediates, leaf -> root-ward, without the root (b"" when there are none)."""
        return b"".join(cert_to_pem(c) for c in self.intermediates)

    @property
    def root_pem(self) -> bytes:
        """The self-signed root."""
        return cert_to_pem(self.root)

    @property
    def fullchain_pem(self) -> bytes:
        """Leaf followed by the intermediates: what tls.crt holds."""
        return self.leaf_pem + self.chain_pem

    @property
    def key_pem(self) -> bytes:
        """The leaf's private key as unencrypted PKCS#8 PEM."""
        return key_to_pem(self.leaf_key, "pkcs8")

    def key_as(self, fmt: KeyFormat, *, passphrase: bytes | None = None) -> bytes:
        """The leaf's private key in another format, optionally encrypted."""
        return key_to_pem(self.leaf_key, fmt, passphrase=passphrase)

    def issue_leaf(
        self,
        cn: str | None = "other.example.com",
        *,
        sans: Sequence[str] | None = None,
        key_type: KeyType = "ec256",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, PrivateKey]:
        """Another leaf under the same issuing CA (the last intermediate, or the root)."""
        issuer, issuer_key = (
            (self.intermediates[0], self.intermediate_keys[0])
            if self.intermediates
            else (self.root, self.root_key)
        )
        key = generate_key(key_type)
        not_before, not_after = _window(now, not_before, not_after)
        return _leaf(cn, sans, key, issuer, issuer_key, not_before, not_after), key


def make_chain(
    cn: str | None = "app.example.com",
    sans: Sequence[str] | None = None,
    key_type: KeyType = "ec256",
    intermediates: int = 1,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    *,
    ca_key_type: KeyType = "ec256",
    fresh_leaf_key: bool = False,
    root_cn: str = "CertAutoPilot Test Root",
    now: dt.datetime | None = None,
) -> Chain:
    """Build root -> `intermediates` CAs -> leaf; dates default to a window around `now`.

    `sans` defaults to [cn]. CA keys are freshly generated per chain (so chains never
    cross-verify); the leaf key is cached per key type unless `fresh_leaf_key` is set.
    """
    if intermediates < 0:
        raise ValueError("intermediates must be >= 0")
    now = now or utcnow()
    not_before, not_after = _window(now, not_before, not_after)
    # CAs outlive the leaf on both sides so only the leaf's dates matter in tests.
    ca_not_before = min(not_before, now) - dt.timedelta(days=365)
    ca_not_after = max(not_after, now) + dt.timedelta(days=3650)

    root_key = generate_key(ca_key_type)
    root_name = _name(root_cn)
    root = issue_certificate(
        subject=root_name,
        public_key=root_key,
        issuer=root_name,
        issuer_key=root_key,
        is_ca=True,
        not_before=ca_not_before,
        not_after=ca_not_after,
    )
    # Built root-ward first, reversed at the end so intermediates[0] is the leaf's issuer.
    issuer, issuer_key = root, root_key
    cas: list[x509.Certificate] = []
    ca_keys: list[PrivateKey] = []
    for level in range(1, intermediates + 1):
        key = generate_key(ca_key_type)
        cert = issue_certificate(
            subject=_name(f"CertAutoPilot Test Intermediate {level}"),
            public_key=key,
            issuer=issuer.subject,
            issuer_key=issuer_key,
            is_ca=True,
            not_before=ca_not_before,
            not_after=ca_not_after,
        )
        cas.append(cert)
        ca_keys.append(key)
        issuer, issuer_key = cert, key

    leaf_key = generate_key(key_type) if fresh_leaf_key else cached_key(key_type)
    leaf = _leaf(cn, sans, leaf_key, issuer, issuer_key, not_before, not_after)
    return Chain(
        leaf=leaf,
        leaf_key=leaf_key,
        intermediates=tuple(reversed(cas)),
        intermediate_keys=tuple(reversed(ca_keys)),
        root=root,
        root_key=root_key,
    )


def make_self_signed(
    cn: str = "self.example.com",
    key_type: KeyType = "ec256",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed leaf (no CA), as produced by `openssl req -x509`."""
    key = cached_key(key_type)
    start, end = _window(now, not_before, not_after)
    name = _name(cn)
    cert = issue_certificate(
        subject=name,
        public_key=key,
        issuer=name,
        issuer_key=key,
        is_ca=False,
        not_before=start,
        not_after=end,
        sans=[cn],
    )
    return cert, key


def make_csr_pem(cn: str = "app.example.com", key_type: KeyType = "ec256") -> bytes:
    """A "CERTIFICATE REQUEST" PEM block (to test wrong-block-type refusals)."""
    key = cached_key(key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(cn))
        .sign(
            key,
            _signature_hash(key),  # type: ignore[arg-type]
        )
    )
    return csr.public_bytes(serialization.Encoding.PEM)
