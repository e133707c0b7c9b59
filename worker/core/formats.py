"""Extra output formats of a TLS bundle: a combined PEM and a PKCS#12 keystore (pure).

A target may ask for two more keys in its ``kubernetes.io/tls`` Secret, next to ``tls.crt``
and ``tls.key``:

* ``tls-combined.pem``: private key, leaf and intermediates in one PEM file, in that order
  (HAProxy's ``crt`` file, and others that read one file). The root is never included, as in
  ``tls.crt``. Deterministic: the same bundle always gives the same bytes.
* ``keystore.p12``: a PKCS#12 keystore (Java's ``PKCS12`` KeyStore type) holding the key and
  the leaf under the alias :data:`KEYSTORE_ALIAS`, with the intermediates as its chain, all
  encrypted with a password taken from a stored credential. PKCS#12 output is randomized
  (salts and IVs), so two builds of the same content never have the same bytes: a keystore is
  compared by its content (:func:`open_keystore`), never by its bytes.

Nothing here reads storage, the network or the clock, and no function returns, logs or puts
into an exception the key or the password: library errors are replaced, never chained.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from worker.core.bundle import TlsBundle, spki_sha256
from worker.core.lru import LruCache

__all__ = [
    "COMBINED_PEM_KEY",
    "KEYSTORE_ALIAS",
    "KEYSTORE_KDF_ROUNDS",
    "KEYSTORE_KEY",
    "MIN_PASSWORD_LENGTH",
    "KeystoreContent",
    "KeystorePasswordError",
    "OpenedKeystore",
    "build_keystore",
    "check_keystore_password",
    "combined_pem",
    "keystore_content_of_bundle",
    "open_keystore",
    "output_formats",
    "split_combined_pem",
]

COMBINED_PEM_KEY = "tls-combined.pem"
KEYSTORE_KEY = "keystore.p12"
#: The keystore entry's alias (PKCS#12 friendly name): Java configs name it (e.g. Tomcat's
#: ``certificateKeyAlias``), so it is fixed, never derived from the certificate.
KEYSTORE_ALIAS = b"tls"
#: PBKDF2 iterations: OpenSSL 3's default for PKCS#12; each open or build costs about this
#: many HMAC-SHA256 rounds per encrypted bag (measured in docs: a few ms).
KEYSTORE_KDF_ROUNDS = 2048
#: keytool refuses keystore passwords shorter than this; a keystore it cannot open is useless.
MIN_PASSWORD_LENGTH = 6


class KeystorePasswordError(ValueError):
    """A PKCS#12 password that Java consumers could not use; the message says why and the fix."""


def check_keystore_password(password: bytes, *, what: str) -> None:
    """Refuse a password keytool and Java would not accept the same way we encode it.

    Printable ASCII only: PKCS#12 turns the password into BMPString, and Java and OpenSSL
    agree on that conversion only for ASCII. The message never quotes the password.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise KeystorePasswordError(
            f"{what} is {len(password)} characters; a PKCS#12 keystore password needs at least "
            f"{MIN_PASSWORD_LENGTH} (keytool refuses shorter ones). Fix: store a longer one, "
            "e.g. `openssl rand -base64 24`"
        )
    if not all(0x20 < byte < 0x7F for byte in password):
        raise KeystorePasswordError(
            f"{what} holds spaces, control characters or non-ASCII bytes; Java and OpenSSL "
            "encode only printable ASCII passwords alike. Fix: store a password of printable "
            "ASCII characters, e.g. `openssl rand -base64 24`"
        )


def combined_pem(bundle: TlsBundle) -> bytes:
    """The ``tls-combined.pem`` value: the private key, the leaf, then the intermediates."""
    return bundle.tls_key() + bundle.tls_crt()


def output_formats(
    bundle: TlsBundle, *, combined: bool, keystore_password: bytes | None
) -> dict[str, bytes]:
    """The extra data keys a target asked for (none, one or both)."""
    extra: dict[str, bytes] = {}
    if combined:
        extra[COMBINED_PEM_KEY] = combined_pem(bundle)
    if keystore_password is not None:
        extra[KEYSTORE_KEY] = _cached_keystore(bundle, keystore_password)
    return extra


#: Keystores built lately, by (SHA-256 of key + certificates, SHA-256 of the password). Every
#: target of a run wants the same keystore: building it (and opening it again to compare with
#: the live one) costs ~75 ms per target for an RSA key, against ~0 for a cache hit. Holds
#: only encrypted keystores; the plain key is in the bundle cache anyway.
_BUILT: LruCache[tuple[bytes, bytes], bytes] = LruCache(32)


def _cached_keystore(bundle: TlsBundle, password: bytes) -> bytes:
    content = hashlib.sha256(bundle.tls_key() + bundle.tls_crt()).digest()
    cache_key = (content, hashlib.sha256(password).digest())
    built = _BUILT.get(cache_key)
    if built is None:
        built = build_keystore(bundle, password)
        _BUILT.put(cache_key, built)
    return built


def split_combined_pem(data: bytes) -> tuple[bytes, bytes]:
    """Split a combined PEM into (its private key blocks, its certificate blocks), for the diff."""
    keys, certs = [], []
    for match in _BLOCK.finditer(data.replace(b"\r\n", b"\n")):
        label = match.group(1)
        block = match.group(0) + b"\n"
        if label == b"CERTIFICATE":
            certs.append(block)
        elif label.endswith(b"PRIVATE KEY"):
            keys.append(block)
    return b"".join(keys), b"".join(certs)


_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----\n.*?\n-----END \1-----", re.DOTALL)


def _encryption(password: bytes) -> serialization.KeySerializationEncryption:
    # PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) with a SHA-256 MAC: what OpenSSL 3 writes by
    # default and Java (8u301+, 11.0.12+, 17) reads; the legacy 3DES/RC2 format is not used.
    return (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(KEYSTORE_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )


def build_keystore(bundle: TlsBundle, password: bytes) -> bytes:
    """The ``keystore.p12`` value: key + leaf (alias ``tls``) with the intermediates, encrypted."""
    key = _bundle_key(bundle)
    leaf = _certificates(bundle.leaf_pem)[0]
    chain = [cert for pem in bundle.chain_pems for cert in _certificates(pem)]
    return pkcs12.serialize_key_and_certificates(
        KEYSTORE_ALIAS,
        key,  # bundle.py admits only PKCS#12-capable key types (RSA, ECDSA, Ed25519)
        leaf,
        chain or None,
        _encryption(password),
    )


def _bundle_key(bundle: TlsBundle) -> Any:
    # build_bundle validated this key already; validating an RSA key again costs ~100 ms.
    return serialization.load_pem_private_key(
        bundle.tls_key(), password=None, unsafe_skip_rsa_key_validation=True
    )


def _certificates(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


@dataclass(frozen=True)
class KeystoreContent:
    """What a keystore holds, as digests: equal content means equal digests (no key inside).

    ``key_sha256`` is the SHA-256 of the private key's unencrypted PKCS#8 DER (so two
    encodings of one key compare equal, two keys never do); ``certificates`` are the SHA-256
    fingerprints of the leaf then the chain, in the keystore's order.
    """

    alias: bytes | None
    key_sha256: str | None
    public_key_sha256: str | None
    certificates: tuple[str, ...]


@dataclass(frozen=True)
class OpenedKeystore:
    """A keystore opened with its password: its content and its certificates as PEM (no key)."""

    content: KeystoreContent
    certificates_pem: bytes
    """The leaf then the chain, PEM (what the diff describes)."""


def open_keystore(data: bytes, password: bytes) -> OpenedKeystore | None:
    """Open a PKCS#12 keystore with ``password``: what it holds, or None when it does not open.

    None covers a wrong password (e.g. the password credential was changed), bytes that are
    no PKCS#12 at all, and a keystore without a key or certificate: in every case, not a
    keystore this target wants.
    """
    try:
        loaded = pkcs12.load_pkcs12(data, password)
    except (ValueError, TypeError):
        return None  # never chained nor quoted: the library's text may describe the input
    entry = loaded.key
    if entry is None or loaded.cert is None:
        return None
    certs = [loaded.cert.certificate, *(extra.certificate for extra in loaded.additional_certs)]
    content = _content(loaded.cert.friendly_name, entry, certs)
    pems = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    return OpenedKeystore(content, pems)


def keystore_content_of_bundle(bundle: TlsBundle) -> KeystoreContent:
    """The content :func:`build_keystore` puts in a keystore for ``bundle`` (nothing encrypted)."""
    certs = [cert for pem in (bundle.leaf_pem, *bundle.chain_pems) for cert in _certificates(pem)]
    return _content(KEYSTORE_ALIAS, _bundle_key(bundle), certs)


def _content(alias: bytes | None, key: Any, certs: list[x509.Certificate]) -> KeystoreContent:
    key_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return KeystoreContent(
        alias=alias,
        key_sha256=hashlib.sha256(key_der).hexdigest(),
        public_key_sha256=spki_sha256(key.public_key()),
        certificates=tuple(
            hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
            for cert in certs
        ),
    )
