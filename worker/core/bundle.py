"""Parse and validate a certificate, its chain and its private key into a TLS bundle (pure).

Input is untrusted PEM text pasted or uploaded by an operator; output is what a
``kubernetes.io/tls`` Secret holds: ``tls.crt`` (leaf + intermediates), ``tls.key`` and,
optionally, ``ca.crt``. Nothing here touches the network, the clock (``now`` is passed in)
or storage.

Rules, in the order they are checked (each failure is a :class:`BundleError` naming the
input, the rule and the fix, except sizes; private key bytes never appear in messages or reprs):

1. Size: each input within ``PEM_FILE`` and all of them together within ``BUNDLE``
   (:mod:`worker.core.limits`), checked before anything is parsed; refused with the limits'
   one error, ``InputTooLarge``, naming the input, the limit and the size seen.
2. Shape: every input is PEM text (not DER, not garbage), every ``BEGIN`` has its ``END``,
   and every block has the type that input expects (``CERTIFICATE`` for cert/chain/ca;
   ``PRIVATE KEY``, ``RSA PRIVATE KEY``, ``EC PRIVATE KEY`` or ``ENCRYPTED PRIVATE KEY``
   for the key; an ``EC PARAMETERS`` block before an EC key is tolerated and dropped).
3. Key: RSA (>= 2048 bits), ECDSA P-256/P-384 or Ed25519, in PKCS#1, SEC1 or PKCS#8. An
   encrypted key needs its passphrase; it is then stored decrypted as PKCS#8, because the
   consumers of a TLS Secret cannot decrypt it. A passphrase given for a plain key is unused.
4. Leaf: ``cert_pem`` may hold a full chain in any order; the leaf is the certificate that
   issues no other certificate in the set (ties broken by the private key). The key must
   match the leaf.
5. Chain: ordered by signature verification (issuer name and signature) from the leaf
   root-ward. Duplicates, certificates unrelated to the leaf's path and gaps (a missing
   intermediate) are refused; every issuer must be a CA. A self-signed root found in the
   chain is moved to ``ca_pem`` and is not written into ``tls.crt``.
6. CA: ``ca_pem`` holds one certificate that must have issued the last intermediate (or
   the leaf when there is none).
7. Validity: an expired or not-yet-valid leaf is refused unless explicitly allowed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from worker.core.limits import BUNDLE, PEM_FILE, InputTooLarge, check_size

MAX_CERTIFICATES = 32
"""At most this many certificates in cert_pem + chain_pem; chain ordering is quadratic."""

MIN_RSA_BITS = 2048

# Input names used in BundleError.input_name, with how messages spell them.
_INPUT_LABELS = {
    "leaf": "certificate (cert_pem)",
    "chain": "chain (chain_pem)",
    "key": "private key (key_pem)",
    "ca": "CA certificate (ca_pem)",
    "certificate": "certificate",
}

_KEY_BLOCK_TYPES = frozenset(
    {"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY"}
)
_MARKER = re.compile(rb"-----(BEGIN|END) ([A-Z0-9 ]{1,64})-----")


class BundleError(ValueError):
    """A certificate/chain/key input broke a bundle rule; the message says which and how to fix it.

    Attributes: ``input_name`` ("leaf", "chain", "key", "ca" or "certificate"), ``rule`` (a
    stable short code such as "key-mismatch"), ``problem`` and ``fix`` (operator-facing text).
    """

    def __init__(self, input_name: str, rule: str, problem: str, fix: str) -> None:
        self.input_name = input_name
        self.rule = rule
        self.problem = problem
        self.fix = fix
        label = _INPUT_LABELS.get(input_name, input_name)
        super().__init__(f"{label}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator (and the database) needs to know about one certificate."""

    subject: str  # RFC 4514 string
    common_name: str | None
    sans: tuple[str, ...]  # DNS names and IP addresses, in certificate order
    serial_hex: str  # lower-case hex, no 0x
    issuer: str
    not_before: datetime  # aware UTC
    not_after: datetime  # aware UTC
    sha256_fingerprint: str  # of the certificate DER; lower-case hex without colons
    public_key_sha256: str  # of the SubjectPublicKeyInfo DER; lower-case hex
    key_type: str  # "RSA-2048", "EC-P256", "EC-P384", "Ed25519" (others only described)


@dataclass(frozen=True, repr=False)
class TlsBundle:
    """A validated leaf with its intermediates, key and (optionally) root, ready for a Secret."""

    leaf: CertificateInfo
    leaf_pem: bytes
    chain_pems: tuple[bytes, ...]  # intermediates, leaf -> root-ward; never the root
    key_pem: bytes  # unencrypted private key PEM; never in repr, str or messages
    ca_pem: bytes | None  # the issuing root when known

    def tls_crt(self) -> bytes:
        """The ``tls.crt`` value: leaf then intermediates, each PEM block ending with a newline."""
        return b"".join(_ensure_newline(pem) for pem in (self.leaf_pem, *self.chain_pems))

    def tls_key(self) -> bytes:
        """The ``tls.key`` value: the unencrypted private key PEM."""
        return _ensure_newline(self.key_pem)

    def ca_crt(self) -> bytes | None:
        """The ``ca.crt`` value (the issuing root), or None when it is not known."""
        return None if self.ca_pem is None else _ensure_newline(self.ca_pem)

    def __repr__(self) -> str:
        # Hand-written so the key can never leak through logging or a traceback's locals.
        return (
            f"TlsBundle(cn={self.leaf.common_name!r}, "
            f"fingerprint={self.leaf.sha256_fingerprint!r}, "
            f"not_after={self.leaf.not_after.isoformat()!r}, "
            f"intermediates={len(self.chain_pems)}, ca={self.ca_pem is not None}, "
            f"key=<redacted>)"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class _Block:
    """One PEM block: its type, its text (BEGIN..END, LF line endings) and 1-based position."""

    label: str
    text: bytes
    position: int


@dataclass(frozen=True)
class _Cert:
    """A parsed certificate and where it came from (for messages)."""

    cert: x509.Certificate
    source: str  # an _INPUT_LABELS key
    position: int

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def where(self) -> str:
        return f"certificate #{self.position} of {_INPUT_LABELS[self.source]} ({self.subject!r})"


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def describe_certificate(pem: bytes) -> CertificateInfo:
    """Describe the first certificate in a PEM blob."""
    return describe_certificates(pem)[0]


def describe_certificates(pem: bytes) -> list[CertificateInfo]:
    """Describe every certificate in a PEM blob, in order (at least one, or BundleError)."""
    _check_size("certificate", pem)
    certs = _parse_certificates("certificate", pem, required=True)
    return [_describe(c.cert) for c in certs]


def public_key_fingerprint_of_private_key(
    key_pem: bytes, *, passphrase: bytes | None = None
) -> str:
    """SHA-256 (hex) of the key's SubjectPublicKeyInfo DER: same value as CertificateInfo's."""
    _check_size("key", key_pem)
    key, _ = _parse_private_key(key_pem, passphrase)
    return spki_sha256(key.public_key())


@dataclass(frozen=True)
class NameChange:
    """How a renewal's names (common name + SANs) differ from those of the certificate it
    replaces. DNS names compare case-insensitively, as TLS clients match them."""

    kept: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    @property
    def unrelated(self) -> bool:
        """No name in common: most likely another service's certificate, renewed by mistake."""
        return not self.kept


def certificate_names(common_name: str | None, sans: Sequence[str]) -> tuple[str, ...]:
    """The names a certificate answers for, lower-cased, first occurrence first."""
    ordered = [common_name] if common_name else []
    ordered.extend(sans)
    return tuple(dict.fromkeys(name.lower() for name in ordered))


def name_change(before: Sequence[str], after: Sequence[str]) -> NameChange:
    """Compare two certificate_names() results."""
    old, new = set(before), set(after)
    return NameChange(
        kept=tuple(name for name in after if name in old),
        added=tuple(name for name in after if name not in old),
        removed=tuple(name for name in before if name not in new),
    )


def build_bundle(
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes = b"",
    ca_pem: bytes | None = None,
    *,
    now: datetime,
    allow_expired: bool = False,
    allow_not_yet_valid: bool = False,
    passphrase: bytes | None = None,
) -> TlsBundle:
    """Validate cert/chain/key/CA inputs against the module rules and assemble a TlsBundle."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    for name, data in (("leaf", cert_pem), ("key", key_pem), ("chain", chain_pem)):
        _check_size(name, data)
    if ca_pem is not None:
        _check_size("ca", ca_pem)
    total = len(cert_pem) + len(key_pem) + len(chain_pem) + len(ca_pem or b"")
    if total > BUNDLE.maximum:
        raise InputTooLarge("the certificate bundle", BUNDLE, total)

    given = _parse_certificates("leaf", cert_pem, required=True)
    extra = _parse_certificates("chain", chain_pem, required=False)
    ca_certs = _parse_certificates("ca", ca_pem, required=False) if ca_pem is not None else []
    if len(ca_certs) > 1:
        raise BundleError(
            "ca",
            "ca-count",
            f"holds {len(ca_certs)} certificates; it must hold only the issuing root",
            "put intermediates in the chain and keep only the root certificate in ca_pem",
        )
    key, key_text = _parse_private_key(key_pem, passphrase)
    _check_key_supported(key)

    everything = [*given, *extra]
    _reject_too_many(everything)
    _reject_duplicates(everything)
    key_spki = spki_sha256(key.public_key())
    leaf = _find_leaf(given, everything, key_spki)
    if spki_sha256(leaf.cert.public_key()) != key_spki:
        raise BundleError(
            "key",
            "key-mismatch",
            f"does not belong to the leaf certificate {leaf.subject!r} (the leaf's public key "
            f"SHA-256 is {spki_sha256(leaf.cert.public_key())[:16]}..., the key's is "
            f"{key_spki[:16]}...)",
            "supply the private key that was generated with this certificate's request, or the "
            "certificate that was issued for this key",
        )

    path = _order_chain(leaf, [c for c in everything if c is not leaf])
    root: _Cert | None = None
    if len(path) > 1 and _is_self_signed(path[-1].cert):
        root = path.pop()
    ca = _choose_ca(path[-1], root, ca_certs[0] if ca_certs else None)
    _check_validity(leaf.cert, now, allow_expired, allow_not_yet_valid)

    return TlsBundle(
        leaf=_describe(leaf.cert),
        leaf_pem=_pem(leaf.cert),
        chain_pems=tuple(_pem(c.cert) for c in path[1:]),
        key_pem=key_text,
        ca_pem=None if ca is None else _pem(ca.cert),
    )


# ---------------------------------------------------------------------------------------------
# PEM scanning
# ---------------------------------------------------------------------------------------------


def _check_size(input_name: str, data: bytes) -> None:
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"{_INPUT_LABELS[input_name]} must be bytes, not {type(data).__name__}")
    check_size(PEM_FILE, data, f"the {_INPUT_LABELS[input_name]}")


def _pem_blocks(input_name: str, data: bytes, *, required: bool) -> list[_Block]:
    """Split PEM text into blocks, refusing DER, garbage and unbalanced BEGIN/END markers."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not text.strip():
        if required:
            raise BundleError(input_name, "empty", "is empty", "paste the PEM text")
        return []
    markers = list(_MARKER.finditer(text))
    if not markers:
        raise _not_pem(input_name, text)

    blocks: list[_Block] = []
    open_marker: re.Match[bytes] | None = None
    for marker in markers:
        kind, label = marker.group(1), marker.group(2).decode("ascii")
        if kind == b"BEGIN":
            if open_marker is not None:
                raise _truncated(input_name, len(blocks) + 1, open_marker)
            open_marker = marker
            continue
        if open_marker is None:
            raise BundleError(
                input_name,
                "truncated",
                f"has '-----END {label}-----' without a matching BEGIN line",
                "copy the whole PEM block, from its BEGIN line to its END line",
            )
        begin_label = open_marker.group(2).decode("ascii")
        if label != begin_label:
            raise BundleError(
                input_name,
                "truncated",
                f"block #{len(blocks) + 1} begins as {begin_label!r} but ends as {label!r}",
                "copy each PEM block whole, from its BEGIN line to its END line",
            )
        blocks.append(
            _Block(begin_label, text[open_marker.start() : marker.end()] + b"\n", len(blocks) + 1)
        )
        open_marker = None
    if open_marker is not None:
        raise _truncated(input_name, len(blocks) + 1, open_marker)
    return blocks


def _not_pem(input_name: str, text: bytes) -> BundleError:
    # DER certificates and keys are an ASN.1 SEQUENCE: first byte 0x30.
    if text[:1] == b"\x30":
        command = "openssl pkey" if input_name == "key" else "openssl x509"
        return BundleError(
            input_name,
            "der",
            "looks like binary DER, but PEM text is required",
            f"convert it with '{command} -inform DER -outform PEM'",
        )
    return BundleError(
        input_name,
        "not-pem",
        "contains no PEM block (no '-----BEGIN ...-----' line)",
        "supply PEM text as produced by your CA or 'openssl ... -outform PEM'",
    )


def _truncated(input_name: str, position: int, marker: re.Match[bytes]) -> BundleError:
    label = marker.group(2).decode("ascii")
    return BundleError(
        input_name,
        "truncated",
        f"block #{position} ('-----BEGIN {label}-----') has no END line; the PEM is truncated",
        "copy the whole PEM block, including its '-----END " + label + "-----' line",
    )


def _wrong_block(input_name: str, block: _Block, expected: str) -> BundleError:
    """A clear refusal for a PEM block of the wrong type, with a hint specific to that type."""
    hints = {
        "CERTIFICATE REQUEST": "this is a certificate signing request (CSR), not a certificate; "
        "submit it to your CA and use the certificate it issues",
        "NEW CERTIFICATE REQUEST": "this is a certificate signing request (CSR), not a "
        "certificate; submit it to your CA and use the certificate it issues",
        "TRUSTED CERTIFICATE": "convert it with 'openssl x509 -in cert.pem -out plain.pem' "
        "(OpenSSL trust settings are not supported)",
        "PUBLIC KEY": "a public key is not enough; supply the private key",
        "RSA PUBLIC KEY": "a public key is not enough; supply the private key",
        "OPENSSH PRIVATE KEY": "OpenSSH key files are not TLS keys; convert with "
        "'ssh-keygen -p -m PKCS8 -f <file>' or use the key generated with the certificate",
        "DSA PRIVATE KEY": "DSA keys are not supported; use RSA, ECDSA P-256/P-384 or Ed25519",
        "CERTIFICATE": "a certificate was given where the private key belongs; put certificates "
        "in cert_pem/chain_pem",
        "PKCS7": "convert it with 'openssl pkcs7 -print_certs -in file.p7b'",
    }
    fix = hints.get(block.label)
    if fix is None:
        if "PRIVATE KEY" in block.label:
            fix = "supply private keys as key_pem, never inside certificate inputs"
        else:
            fix = f"supply {expected} PEM blocks only"
    # Never echo the block's content: it could be a private key pasted into the wrong field.
    return BundleError(
        input_name,
        "wrong-block",
        f"block #{block.position} is a '{block.label}' block, expected {expected}",
        fix,
    )


def _parse_certificates(input_name: str, data: bytes, *, required: bool) -> list[_Cert]:
    certs: list[_Cert] = []
    for block in _pem_blocks(input_name, data, required=required):
        if block.label != "CERTIFICATE":
            raise _wrong_block(input_name, block, "'CERTIFICATE'")
        try:
            cert = x509.load_pem_x509_certificate(block.text)
            # Names and validity are decoded lazily; touch them now so a malformed
            # certificate fails here, as a BundleError, rather than later.
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.public_key())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise BundleError(
                input_name,
                "undecodable",
                f"certificate block #{block.position} cannot be decoded ({exc}); "
                "it is corrupted or truncated",
                "copy the certificate again from its source, whole and unmodified",
            ) from None
        certs.append(_Cert(cert, input_name, block.position))
    return certs


# ---------------------------------------------------------------------------------------------
# Private keys
# ---------------------------------------------------------------------------------------------


def _parse_private_key(data: bytes, passphrase: bytes | None) -> tuple[PrivateKeyTypes, bytes]:
    """Load the one private key in key_pem; return it with the PEM text to store (unencrypted)."""
    blocks = [b for b in _pem_blocks("key", data, required=True) if b.label != "EC PARAMETERS"]
    for block in blocks:
        if block.label not in _KEY_BLOCK_TYPES:
            raise _wrong_block("key", block, "a private key")
    if not blocks:
        raise BundleError(
            "key",
            "no-key",
            "holds EC parameters but no private key",
            "supply the 'EC PRIVATE KEY' or 'PRIVATE KEY' block",
        )
    if len(blocks) > 1:
        raise BundleError(
            "key",
            "multiple-keys",
            f"holds {len(blocks)} private keys; exactly one is needed",
            "supply only the private key that belongs to the certificate",
        )
    block = blocks[0]
    encrypted = block.label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block.text
    if encrypted and not passphrase:
        raise BundleError(
            "key",
            "encrypted-key",
            "is encrypted and no passphrase was given",
            "supply the key's passphrase, or decrypt it first with "
            "'openssl pkey -in key.pem -out key-decrypted.pem'",
        )
    try:
        key = serialization.load_pem_private_key(
            block.text, password=passphrase if encrypted else None
        )
    except (ValueError, TypeError):
        # Never chain the library's exception: its text could quote key material.
        if encrypted:
            raise BundleError(
                "key",
                "bad-passphrase",
                "cannot be decrypted with the given passphrase (or the key is corrupted)",
                "check the passphrase; if it is right, export the key again",
            ) from None
        raise BundleError(
            "key",
            "undecodable",
            "cannot be decoded; it is corrupted or truncated",
            "copy the private key again from its source, whole and unmodified",
        ) from None
    except UnsupportedAlgorithm:
        raise BundleError(
            "key",
            "unsupported-key",
            "uses an algorithm this module does not support",
            "use an RSA (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key",
        ) from None
    if encrypted:
        # tls.key must be readable by the consumer (ingress controller, app): store it clear.
        text = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        text = block.text
    return key, text


def _check_key_supported(key: PrivateKeyTypes) -> None:
    name = _key_type(key.public_key())
    fix = "use an RSA (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise BundleError(
                "key",
                "weak-key",
                f"is {name}; RSA keys shorter than {MIN_RSA_BITS} bits are refused",
                fix,
            )
        return
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            return
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return
    raise BundleError("key", "unsupported-key", f"is {name}, which is not supported", fix)


# ---------------------------------------------------------------------------------------------
# Chain assembly
# ---------------------------------------------------------------------------------------------


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True when parent's subject is child's issuer and parent's key verifies child's signature."""
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _reject_too_many(certs: Sequence[_Cert]) -> None:
    if len(certs) > MAX_CERTIFICATES:
        raise BundleError(
            "chain",
            "too-many",
            f"cert_pem and chain_pem hold {len(certs)} certificates together, more than "
            f"{MAX_CERTIFICATES}",
            "supply the leaf and its intermediates only, not a CA bundle",
        )


def _reject_duplicates(certs: Sequence[_Cert]) -> None:
    seen: dict[bytes, _Cert] = {}
    for c in certs:
        der = c.cert.public_bytes(serialization.Encoding.DER)
        first = seen.get(der)
        if first is not None:
            raise BundleError(
                c.source,
                "duplicate",
                f"{c.where} is a duplicate of {first.where}",
                "remove the repeated certificate (a chain lists each certificate once)",
            )
        seen[der] = c


def _find_leaf(given: Sequence[_Cert], everything: Sequence[_Cert], key_spki: str) -> _Cert:
    """The leaf is the certificate of cert_pem that issues no other certificate in the set."""
    candidates = [
        c for c in given if not any(o is not c and _issued_by(o.cert, c.cert) for o in everything)
    ]
    if not candidates:
        top = given[0]
        issued = next(o for o in everything if o is not top and _issued_by(o.cert, top.cert))
        raise BundleError(
            "leaf",
            "leaf-is-ca",
            f"{top.where} issued {issued.where}, so it is not the leaf",
            "put the leaf (end-entity) certificate in cert_pem and its intermediates in "
            "chain_pem; the two inputs may be swapped",
        )
    if len(candidates) > 1:
        # Two end-entity certificates: the private key tells which one is meant, and the
        # other is then reported as unrelated by the chain ordering.
        matching = [c for c in candidates if spki_sha256(c.cert.public_key()) == key_spki]
        if len(matching) == 1:
            return matching[0]
        subjects = ", ".join(repr(c.subject) for c in candidates)
        raise BundleError(
            "leaf",
            "ambiguous-leaf",
            f"holds {len(candidates)} certificates that issue no other one ({subjects}), so "
            "the leaf cannot be told apart",
            "supply exactly one leaf certificate, optionally followed by its own intermediates",
        )
    return candidates[0]


def _order_chain(leaf: _Cert, others: list[_Cert]) -> list[_Cert]:
    """Walk from the leaf root-ward by signature; everything must end up on the path."""
    path = [leaf]
    remaining = list(others)
    while remaining and not _is_self_signed(path[-1].cert):
        current = path[-1]
        issuers = [c for c in remaining if _issued_by(current.cert, c.cert)]
        if not issuers:
            break
        if len(issuers) > 1:
            names = ", ".join(i.where for i in issuers)
            raise BundleError(
                issuers[1].source,
                "ambiguous-issuer",
                f"{len(issuers)} certificates could have issued {current.subject!r}: {names}",
                "keep only the intermediate your CA delivered with this certificate",
            )
        issuer = issuers[0]
        _require_ca(issuer, current)
        path.append(issuer)
        remaining.remove(issuer)
    if remaining:
        raise _does_not_connect(path[-1], remaining)
    return path


def _require_ca(issuer: _Cert, child: _Cert) -> None:
    try:
        constraints = issuer.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return  # legacy v1 CA certificates carry no extensions; the signature already matched
    if not constraints.ca:
        raise BundleError(
            issuer.source,
            "not-a-ca",
            f"{issuer.where} signed {child.subject!r} but is not a CA certificate",
            "use the intermediate certificate your CA published, not another leaf",
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return _is_self_signed(cert)  # a legacy v1 root


def _does_not_connect(top: _Cert, remaining: Sequence[_Cert]) -> BundleError:
    """Explain leftovers: a re-keyed issuer, a gap (missing intermediate) or foreign certs."""
    names = ", ".join(c.where for c in remaining)
    wanted = top.cert.issuer.rfc4514_string()
    same_name = [c for c in remaining if c.cert.subject == top.cert.issuer]
    if same_name:
        return BundleError(
            same_name[0].source,
            "signature-mismatch",
            f"{same_name[0].where} has the name of the issuer of {top.subject!r}, but its key "
            "did not sign it (a re-keyed or different CA with the same name)",
            "use the intermediate your CA delivered together with this certificate",
        )
    if not any(_is_ca(c.cert) for c in remaining):
        return BundleError(
            remaining[0].source,
            "unrelated",
            f"{names} is not on the leaf's chain: it is an end-entity certificate, and the "
            f"leaf's path stops at {top.subject!r}",
            "remove certificates that do not belong to this leaf's chain",
        )
    # Leftover CA certificates: either the upper part of this chain with a link missing, or a
    # chain for another certificate. Without the missing link the two look alike.
    return BundleError(
        remaining[0].source,
        "chain-gap",
        f"the chain does not connect: nothing in it issued {top.subject!r} (whose issuer is "
        f"{wanted!r}), so {names} cannot be linked to the leaf",
        f"add the missing intermediate {wanted!r}, or remove certificates that belong to "
        "another chain",
    )


def _choose_ca(top: _Cert, chain_root: _Cert | None, given_ca: _Cert | None) -> _Cert | None:
    """ca.crt: the given CA (which must have issued the top of the path), else the chain's root."""
    if given_ca is None:
        return chain_root
    if not _issued_by(top.cert, given_ca.cert):
        raise BundleError(
            "ca",
            "ca-mismatch",
            f"{given_ca.subject!r} did not issue {top.subject!r} (the last certificate of the "
            f"chain, whose issuer is {top.cert.issuer.rfc4514_string()!r})",
            "supply the root certificate that issued the last intermediate",
        )
    return given_ca


def _check_validity(
    cert: x509.Certificate, now: datetime, allow_expired: bool, allow_not_yet_valid: bool
) -> None:
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > not_after and not allow_expired:
        raise BundleError(
            "leaf",
            "expired",
            f"expired on {not_after.isoformat()} (now is {now.isoformat()})",
            "renew the certificate, or allow expired certificates explicitly",
        )
    if now < not_before and not allow_not_yet_valid:
        raise BundleError(
            "leaf",
            "not-yet-valid",
            f"is not valid before {not_before.isoformat()} (now is {now.isoformat()})",
            "wait until it becomes valid, or allow not-yet-valid certificates explicitly",
        )


# ---------------------------------------------------------------------------------------------
# Description helpers
# ---------------------------------------------------------------------------------------------


def _describe(cert: x509.Certificate) -> CertificateInfo:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = None
    if cns:
        value = cns[0].value
        common_name = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans: tuple[str, ...] = ()
    else:
        sans = tuple(
            name.value if isinstance(name, x509.DNSName) else str(name.value)
            for name in san_ext
            if isinstance(name, x509.DNSName | x509.IPAddress)
        )
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        common_name=common_name,
        sans=sans,
        serial_hex=format(cert.serial_number, "x"),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256_fingerprint=hashlib.sha256(
            cert.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
        public_key_sha256=spki_sha256(cert.public_key()),
        key_type=_key_type(cert.public_key()),
    )


_CURVE_NAMES = {"secp256r1": "P256", "secp384r1": "P384", "secp521r1": "P521"}


def _key_type(public_key: PublicKeyTypes) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC-" + _CURVE_NAMES.get(public_key.curve.name, public_key.curve.name)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(public_key, dsa.DSAPublicKey):
        return f"DSA-{public_key.key_size}"
    return type(public_key).__name__.removeprefix("_").replace("PublicKey", "")


def spki_sha256(public_key: PublicKeyTypes) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _pem(cert: x509.Certificate) -> bytes:
    # Re-encoded rather than copied: drops "Bag Attributes"/"subject=" noise and CRLFs.
    return cert.public_bytes(serialization.Encoding.PEM)


def _ensure_newline(pem: bytes) -> bytes:
    return pem if pem.endswith(b"\n") else pem + b"\n"
