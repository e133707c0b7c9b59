"""The desired ``kubernetes.io/tls`` Secret, the update body, and the diff an operator reads (pure).

Like cert-manager's issuing controller, the Secret is built by a pure function and written
once. Ownership follows DESIGN.md decision 2: ``data`` and ``type`` are ours; of the labels
and annotations, ours are the ``app.kubernetes.io/managed-by`` label and every annotation
under ``certautopilot.io/`` — everything else belongs to someone else and is kept.

Nothing here talks to the network or the clock, and no function puts key material into its
output: the diff shows a private key only as the SHA-256 of its public key.

A target's extra output formats (:mod:`worker.core.formats`) are more data keys of the same
Secret, so the diff, the no-write rule, the snapshot and rollback treat them like the
standard keys. A PKCS#12 keystore is the one value whose bytes differ at each build: before
comparing, :func:`reuse_equal_keystore` puts the live keystore's bytes into the desired
Secret when it opens with the current password and holds the same key and chain.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Literal

from worker.core.bundle import (
    BundleError,
    CertificateInfo,
    describe_certificates,
    public_key_fingerprint_of_private_key,
)
from worker.core.formats import (
    COMBINED_PEM_KEY,
    KEYSTORE_KEY,
    OpenedKeystore,
    open_keystore,
    split_combined_pem,
)
from worker.core.lru import LruCache

__all__ = [
    "ANNOTATION_PREFIX",
    "ANN_CERTIFICATE_SHA256",
    "ANN_CONTENT_SHA256",
    "ANN_DISTRIBUTION_ID",
    "ANN_NOT_AFTER",
    "ANN_SERIAL",
    "MANAGED_BY_LABEL",
    "MANAGED_BY_VALUE",
    "MAX_SECRET_DATA_BYTES",
    "TLS_SECRET_TYPE",
    "BundleSummary",
    "CertificateSummary",
    "DataEntry",
    "KeySummary",
    "MetaChange",
    "OpaqueSummary",
    "SecretDiff",
    "content_sha256",
    "decoded_data",
    "desired_secret",
    "diff_secrets",
    "is_managed",
    "prepare_update",
    "render_diff",
    "reuse_equal_keystore",
    "secret_content_equal",
    "secret_manifest",
]

TLS_SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 (a type name, not a password)
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "certautopilot"
ANNOTATION_PREFIX = "certautopilot.io/"
ANN_CERTIFICATE_SHA256 = ANNOTATION_PREFIX + "certificate-sha256"
ANN_SERIAL = ANNOTATION_PREFIX + "serial"
ANN_NOT_AFTER = ANNOTATION_PREFIX + "not-after"
ANN_DISTRIBUTION_ID = ANNOTATION_PREFIX + "distribution-id"
#: Hash of the data: a Deployment can copy it into a pod-template annotation
#: (the "checksum/tls" pattern) so a changed certificate rolls the pods.
ANN_CONTENT_SHA256 = ANNOTATION_PREFIX + "content-sha256"

#: The API server's limit (validation.MaxSecretSize), counted as it counts: key + value bytes.
MAX_SECRET_DATA_BYTES = 1024 * 1024

_CERT_KEYS = ("tls.crt", "ca.crt")
_KEY_KEYS = ("tls.key",)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def content_sha256(data: Mapping[str, bytes]) -> str:
    """Return a SHA-256 over the Secret's data (keys sorted, length-prefixed: unambiguous)."""
    digest = hashlib.sha256()
    for key in sorted(data):
        for part in (key.encode(), data[key]):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def desired_secret(
    *,
    name: str,
    namespace: str,
    tls_crt: bytes,
    tls_key: bytes,
    ca_crt: bytes | None,
    leaf: CertificateInfo,
    distribution_id: str,
    extra_data: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """Return the manifest (JSON-able dict) of the Secret we want (see :func:`data_size`).

    ``extra_data``: the target's extra output formats (``tls-combined.pem``, ``keystore.p12``).
    """
    data = {"tls.crt": tls_crt, "tls.key": tls_key}
    if ca_crt is not None:
        data["ca.crt"] = ca_crt
    data.update(extra_data or {})
    return secret_manifest(
        name=name,
        namespace=namespace,
        secret_type=TLS_SECRET_TYPE,
        data={key: _b64(value) for key, value in data.items()},
        labels={MANAGED_BY_LABEL: MANAGED_BY_VALUE},
        annotations={
            ANN_CERTIFICATE_SHA256: leaf.sha256_fingerprint,
            ANN_SERIAL: leaf.serial_hex,
            ANN_NOT_AFTER: leaf.not_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            ANN_DISTRIBUTION_ID: distribution_id,
            ANN_CONTENT_SHA256: content_sha256(data),
        },
    )


def data_size(secret: Mapping[str, Any]) -> int:
    """Bytes of a Secret's data as the API server counts them (keys + decoded values)."""
    return sum(len(key) + len(value) for key, value in decoded_data(secret).items())


def secret_manifest(
    *,
    name: str,
    namespace: str,
    secret_type: str,
    data: Mapping[str, str],
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
) -> dict[str, Any]:
    """Return a v1 Secret manifest (``data`` values already base64)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels),
            "annotations": dict(annotations),
        },
        "type": secret_type,
        "data": dict(data),
    }


def _metadata(secret: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = secret.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(secret: Mapping[str, Any]) -> dict[str, str]:
    return dict(_metadata(secret).get("labels") or {})


def _annotations(secret: Mapping[str, Any]) -> dict[str, str]:
    return dict(_metadata(secret).get("annotations") or {})


def _is_our_label(key: str) -> bool:
    return key == MANAGED_BY_LABEL


def _is_our_annotation(key: str) -> bool:
    return key.startswith(ANNOTATION_PREFIX)


def _ours(values: Mapping[str, str], is_ours: Any) -> dict[str, str]:
    return {k: v for k, v in values.items() if is_ours(k)}


def decoded_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """Return the Secret's data with values base64-decoded (invalid base64 reads as empty)."""
    out: dict[str, bytes] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(value or "", validate=True)
        except (binascii.Error, ValueError):
            out[key] = b""
    return out


def is_managed(live: Mapping[str, Any]) -> bool:
    """Return whether the live Secret carries our managed-by label."""
    return _labels(live).get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE


def secret_content_equal(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Return whether writing ``desired`` would change nothing we own (data, type, our metadata)."""
    return (
        live.get("type") == desired.get("type")
        and decoded_data(live) == decoded_data(desired)
        and _ours(_labels(live), _is_our_label) == _ours(_labels(desired), _is_our_label)
        and _ours(_annotations(live), _is_our_annotation)
        == _ours(_annotations(desired), _is_our_annotation)
    )


def prepare_update(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Return the PUT body: our data, type and metadata; others' metadata, resourceVersion kept."""
    meta = copy.deepcopy(dict(_metadata(live)))
    # The server keeps managedFields when a PUT omits them; sending them back is just bytes.
    meta.pop("managedFields", None)
    labels = {k: v for k, v in _labels(live).items() if not _is_our_label(k)}
    labels.update(_ours(_labels(desired), _is_our_label))
    annotations = {k: v for k, v in _annotations(live).items() if not _is_our_annotation(k)}
    annotations.update(_ours(_annotations(desired), _is_our_annotation))
    for key, values in (("labels", labels), ("annotations", annotations)):
        if values:
            meta[key] = values
        else:
            meta.pop(key, None)
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": desired.get("type"),
        "data": dict(desired.get("data") or {}),
    }
    if "immutable" in live:
        body["immutable"] = live["immutable"]
    return body


# --- the diff -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateSummary:
    """What an operator compares between two certificates (first one of the PEM + chain length)."""

    subject: str | None
    sans: tuple[str, ...]
    issuer: str | None
    serial: str | None
    not_after: str | None
    sha256_fingerprint: str | None
    chain_length: int
    error: str | None = None

    @classmethod
    def of(cls, pem: bytes) -> CertificateSummary:
        """Summarise a PEM blob (its first certificate), or say why it cannot be read."""
        try:
            infos = describe_certificates(pem)
        except (BundleError, ValueError):
            return cls(
                None, (), None, None, None, None, 0, f"not a PEM certificate ({len(pem)} bytes)"
            )
        first = infos[0]
        return cls(
            subject=first.subject,
            sans=tuple(first.sans),
            issuer=first.issuer,
            serial=first.serial_hex,
            not_after=first.not_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            sha256_fingerprint=first.sha256_fingerprint,
            chain_length=len(infos),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {
            "subject": self.subject,
            "sans": list(self.sans),
            "issuer": self.issuer,
            "serial": self.serial,
            "not_after": self.not_after,
            "sha256_fingerprint": self.sha256_fingerprint,
            "chain_length": self.chain_length,
            "error": self.error,
        }


@dataclass(frozen=True)
class KeySummary:
    """A private key, shown only as the SHA-256 of its public key."""

    public_key_sha256: str | None
    error: str | None = None

    @classmethod
    def of(cls, key_pem: bytes) -> KeySummary:
        """Summarise a private key PEM without revealing it."""
        try:
            return cls(public_key_fingerprint_of_private_key(key_pem))
        except (BundleError, ValueError):
            return cls(None, f"not a usable private key ({len(key_pem)} bytes)")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {"public_key_sha256": self.public_key_sha256, "error": self.error}


@dataclass(frozen=True)
class OpaqueSummary:
    """A data key we do not interpret (shown by size only: it may be someone's secret)."""

    size: int

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {"size": self.size}


@dataclass(frozen=True)
class BundleSummary:
    """A value holding a key and certificates (combined PEM, PKCS#12 keystore), no key material.

    ``kind`` is "combined_pem" or "pkcs12"; ``error`` says why it could not be read (for a
    keystore: it does not open with the target's current password, or is no PKCS#12).
    """

    kind: str
    size: int
    certificate: CertificateSummary | None
    public_key_sha256: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {
            "format": self.kind,
            "size": self.size,
            "certificate": self.certificate.to_dict() if self.certificate else None,
            "public_key_sha256": self.public_key_sha256,
            "error": self.error,
        }


Summary = CertificateSummary | KeySummary | OpaqueSummary | BundleSummary
Change = Literal["added", "removed", "changed", "unchanged"]


@dataclass(frozen=True)
class DataEntry:
    """One data key, old -> new."""

    key: str
    change: Change
    old: Summary | None
    new: Summary | None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {
            "key": self.key,
            "change": self.change,
            "old": self.old.to_dict() if self.old else None,
            "new": self.new.to_dict() if self.new else None,
        }


@dataclass(frozen=True)
class MetaChange:
    """One label or annotation that the write changes (None = absent)."""

    key: str
    old: str | None
    new: str | None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {"key": self.key, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class SecretDiff:
    """Live Secret versus desired: the action, per-key changes, metadata changes and warnings."""

    action: Literal["create", "update", "unchanged"]
    namespace: str
    name: str
    unmanaged: bool
    immutable: bool
    old_type: str | None
    new_type: str
    data: tuple[DataEntry, ...]
    labels: tuple[MetaChange, ...]
    annotations: tuple[MetaChange, ...]
    live_resource_version: str | None

    @property
    def type_changes(self) -> bool:
        """Whether the live Secret has another type than ours (type is immutable)."""
        return self.old_type is not None and self.old_type != self.new_type

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form (never key material)."""
        return {
            "action": self.action,
            "namespace": self.namespace,
            "name": self.name,
            "unmanaged": self.unmanaged,
            "immutable": self.immutable,
            "old_type": self.old_type,
            "new_type": self.new_type,
            "data": [entry.to_dict() for entry in self.data],
            "labels": [change.to_dict() for change in self.labels],
            "annotations": [change.to_dict() for change in self.annotations],
            "live_resource_version": self.live_resource_version,
        }


def _summary(key: str, value: bytes, keystore_password: bytes | None) -> Summary:
    if key in _CERT_KEYS:
        return _cached_summary(CertificateSummary, value)
    if key in _KEY_KEYS:
        return _cached_summary(KeySummary, value)
    if key == COMBINED_PEM_KEY:
        return _combined_pem_summary(value)
    if key == KEYSTORE_KEY:
        return _keystore_summary(value, keystore_password)
    return OpaqueSummary(len(value))


def _combined_pem_summary(value: bytes) -> BundleSummary:
    key_pem, certs_pem = split_combined_pem(value)
    key = _cached_summary(KeySummary, key_pem)
    certificate = _cached_summary(CertificateSummary, certs_pem)
    assert isinstance(key, KeySummary) and isinstance(certificate, CertificateSummary)
    problems = [p for p in (certificate.error, key.error) if p]
    error = f"not a combined PEM: {'; '.join(problems)}" if problems else None
    return BundleSummary("combined_pem", len(value), certificate, key.public_key_sha256, error)


#: Keystores opened lately, by (SHA-256 of the bytes, SHA-256 of the password): every target
#: of a run opens the same live keystore, and each open costs a key derivation.
#: A miss that did not open is cached too (as ``(None,)``).
_KEYSTORES: LruCache[tuple[bytes, bytes], tuple[OpenedKeystore | None]] = LruCache(64)


def _opened_keystore(value: bytes, password: bytes) -> OpenedKeystore | None:
    cache_key = (hashlib.sha256(value).digest(), hashlib.sha256(password).digest())
    hit = _KEYSTORES.get(cache_key)
    if hit is not None:
        return hit[0]
    opened = open_keystore(value, password)
    _KEYSTORES.put(cache_key, (opened,))
    return opened


def _keystore_summary(value: bytes, password: bytes | None) -> BundleSummary:
    if password is None:
        return BundleSummary("pkcs12", len(value), None, None, "not opened (no password given)")
    opened = _opened_keystore(value, password)
    if opened is None:
        return BundleSummary(
            "pkcs12",
            len(value),
            None,
            None,
            "does not open with the target's current password (the password credential "
            "changed, or it is not a PKCS#12 keystore)",
        )
    certificate = _cached_summary(CertificateSummary, opened.certificates_pem)
    assert isinstance(certificate, CertificateSummary)
    return BundleSummary(
        "pkcs12", len(value), certificate, opened.content.public_key_sha256, certificate.error
    )


def reuse_equal_keystore(
    live: Mapping[str, Any] | None, desired: dict[str, Any], password: bytes | None
) -> dict[str, Any]:
    """Return ``desired`` with the live ``keystore.p12`` bytes when both hold the same content.

    PKCS#12 output is randomized (salts, IVs), so a freshly built keystore never equals the
    live one byte for byte. When the live keystore opens with the *current* password and holds
    the same key, certificates and alias as the desired one, the live bytes are kept (and the
    content hash annotation recomputed): the no-write-when-unchanged rule then holds. A live
    keystore that does not open with the current password (the password credential changed)
    is different content, so the new keystore is written.
    """
    live_value = decoded_data(live).get(KEYSTORE_KEY) if live is not None else None
    wanted = decoded_data(desired).get(KEYSTORE_KEY)
    if password is None or live_value is None or wanted is None or live_value == wanted:
        return desired
    live_opened = _opened_keystore(live_value, password)
    wanted_opened = _opened_keystore(wanted, password)
    if live_opened is None or wanted_opened is None:
        return desired
    if live_opened.content != wanted_opened.content:
        return desired
    settled = copy.deepcopy(desired)
    settled["data"][KEYSTORE_KEY] = _b64(live_value)
    annotations = settled["metadata"].get("annotations") or {}
    if ANN_CONTENT_SHA256 in annotations:
        annotations[ANN_CONTENT_SHA256] = content_sha256(decoded_data(settled))
    return settled


#: Summaries of the certificates and keys diffed lately, by (kind, SHA-256 of the PEM).
_SUMMARIES: LruCache[tuple[str, bytes], Summary] = LruCache(64)


def _cached_summary(kind: type[CertificateSummary] | type[KeySummary], value: bytes) -> Summary:
    # Every target of a run diffs the same certificate and key: parsing them again (loading
    # a private key validates it) was ~5% of a worker's CPU per target (bench/). Keyed by
    # the digest, so no key material stays in the cache; summaries are immutable.
    cache_key = (kind.__name__, hashlib.sha256(value).digest())
    summary = _SUMMARIES.get(cache_key)
    if summary is None:
        summary = kind.of(value)
        _SUMMARIES.put(cache_key, summary)
    return summary


def _data_entries(
    old: Mapping[str, bytes], new: Mapping[str, bytes], keystore_password: bytes | None
) -> tuple[DataEntry, ...]:
    standard = ("tls.crt", "tls.key", "ca.crt", COMBINED_PEM_KEY, KEYSTORE_KEY)
    order = [k for k in standard if k in old or k in new]
    order += sorted((set(old) | set(new)) - set(order))
    entries = []
    for key in order:
        before = _summary(key, old[key], keystore_password) if key in old else None
        after = _summary(key, new[key], keystore_password) if key in new else None
        if before is None:
            change: Change = "added"
        elif after is None:
            change = "removed"
        else:
            change = "unchanged" if old[key] == new[key] else "changed"
        entries.append(DataEntry(key, change, before, after))
    return tuple(entries)


def _meta_changes(old: Mapping[str, str], new: Mapping[str, str]) -> tuple[MetaChange, ...]:
    return tuple(
        MetaChange(key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    )


def diff_secrets(
    live: Mapping[str, Any] | None,
    desired: Mapping[str, Any],
    *,
    keystore_password: bytes | None = None,
) -> SecretDiff:
    """Return what writing ``desired`` over ``live`` (None = absent) would change.

    ``keystore_password`` opens ``keystore.p12`` values to describe them (key never shown).
    """
    meta = _metadata(desired)
    new_type = str(desired.get("type") or "")
    if live is None:
        return SecretDiff(
            action="create",
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            unmanaged=False,
            immutable=False,
            old_type=None,
            new_type=new_type,
            data=_data_entries({}, decoded_data(desired), keystore_password),
            labels=_meta_changes({}, _labels(desired)),
            annotations=_meta_changes({}, _annotations(desired)),
            live_resource_version=None,
        )
    body = prepare_update(live, desired)
    live_meta = _metadata(live)
    return SecretDiff(
        action="unchanged" if secret_content_equal(live, desired) else "update",
        namespace=str(live_meta.get("namespace") or meta.get("namespace") or ""),
        name=str(live_meta.get("name") or meta.get("name") or ""),
        unmanaged=not is_managed(live),
        immutable=live.get("immutable") is True,
        old_type=str(live.get("type") or "Opaque"),
        new_type=new_type,
        data=_data_entries(decoded_data(live), decoded_data(desired), keystore_password),
        labels=_meta_changes(_labels(live), _labels(body)),
        annotations=_meta_changes(_annotations(live), _annotations(body)),
        live_resource_version=live_meta.get("resourceVersion"),
    )


# --- rendering ------------------------------------------------------------------------------


def _arrow(old: object, new: object) -> str:
    def text(value: object) -> str:
        if value is None:
            return "(none)"
        if isinstance(value, tuple):
            return ", ".join(value) if value else "(none)"
        return str(value)

    return text(new) if old == new else f"{text(old)} -> {text(new)}"


def _render_entry(entry: DataEntry) -> list[str]:
    head = f"  {entry.key}: {entry.change}"
    # For an added or removed key, show its one side as if unchanged (a single value).
    old = entry.old if entry.old is not None else entry.new
    new = entry.new if entry.new is not None else entry.old
    if isinstance(old, KeySummary) and isinstance(new, KeySummary):
        before, after = old.public_key_sha256 or old.error, new.public_key_sha256 or new.error
        return [f"{head} (public key sha256 {_arrow(before, after)})"]
    if isinstance(old, CertificateSummary) and isinstance(new, CertificateSummary):
        return [head, *_certificate_lines(old, new)]
    if isinstance(old, BundleSummary) and isinstance(new, BundleSummary):
        return _render_bundle(head, old, new)
    sizes = _arrow(getattr(old, "size", None), getattr(new, "size", None))
    return [f"{head} ({sizes} bytes)"]


def _certificate_lines(old: CertificateSummary, new: CertificateSummary) -> list[str]:
    lines = []
    for label, attr in _CERT_FIELDS:
        before, after = getattr(old, attr), getattr(new, attr)
        if attr != "error" or before is not None or after is not None:
            lines.append(f"      {label:<13}{_arrow(before, after)}")
    return lines


_NO_CERTIFICATE = CertificateSummary(None, (), None, None, None, None, 0)


def _render_bundle(head: str, old: BundleSummary, new: BundleSummary) -> list[str]:
    # Key and certificates as for tls.key and tls.crt; a value that could not be read says why.
    label = {"combined_pem": "key + leaf + chain", "pkcs12": "PKCS#12, key + leaf + chain"}
    sizes = _arrow(old.size, new.size)
    lines = [f"{head} ({label.get(new.kind, new.kind)}, {sizes} bytes)"]
    if old.certificate is not None or new.certificate is not None:
        lines += _certificate_lines(
            old.certificate or _NO_CERTIFICATE, new.certificate or _NO_CERTIFICATE
        )
    lines.append(f"      {'key sha256':<13}{_arrow(old.public_key_sha256, new.public_key_sha256)}")
    problems = _arrow(old.error, new.error)
    if old.error is not None or new.error is not None:
        lines.append(f"      {'problem':<13}{problems}")
    return lines


_CERT_FIELDS = (
    ("subject", "subject"),
    ("SANs", "sans"),
    ("issuer", "issuer"),
    ("serial", "serial"),
    ("not-after", "not_after"),
    ("sha256", "sha256_fingerprint"),
    ("chain length", "chain_length"),
    ("problem", "error"),
)


def _render_meta(title: str, changes: tuple[MetaChange, ...]) -> list[str]:
    if not changes:
        return []
    lines = [f"  {title}:"]
    for change in changes:
        if change.old is None:
            lines.append(f"      + {change.key}: {change.new}")
        elif change.new is None:
            lines.append(f"      - {change.key}: {change.old}")
        else:
            lines.append(f"      ~ {change.key}: {change.old} -> {change.new}")
    return lines


def render_diff(
    diff: SecretDiff, *, dry_run: bool = True, adopt_unmanaged: bool | None = None
) -> str:
    """Return the diff as text an operator reads in dry-run output (no key material).

    ``adopt_unmanaged`` is the target's setting when the caller knows it: an unmanaged
    Secret's line then says what execute will do for this target (adopt it, or refuse).
    """
    verbs = {
        "create": ("would create", "create"),
        "update": ("would update", "update"),
        "unchanged": ("unchanged", "unchanged"),
    }
    verb = verbs[diff.action][0 if dry_run else 1]
    head = f'Secret "{diff.namespace}/{diff.name}": {verb}'
    if diff.action == "create":
        head += " (it does not exist yet)"
    elif diff.live_resource_version:
        head += f" (live resourceVersion {diff.live_resource_version})"
    lines = [head]
    if diff.unmanaged:
        unmanaged = f"not managed by CertAutoPilot (no {MANAGED_BY_LABEL}={MANAGED_BY_VALUE} label)"
        if adopt_unmanaged is True:
            lines.append(
                f"  NOTE: {unmanaged}; this target adopts unmanaged Secrets: execute will adopt "
                "it (its other labels and annotations are kept)"
            )
        elif adopt_unmanaged is False:
            lines.append(
                f"  WARNING: {unmanaged}; execute refuses: this target does not adopt "
                "unmanaged Secrets (add it with --adopt-unmanaged to adopt it)"
            )
        else:
            lines.append(
                f"  WARNING: {unmanaged}; execute refuses unless the target adopts unmanaged "
                "Secrets"
            )
    if diff.type_changes:
        lines.append(
            f"  WARNING: type {diff.old_type} -> {diff.new_type} is impossible (type is "
            "immutable); execute refuses"
        )
    if diff.immutable and diff.action != "unchanged":
        lines.append("  WARNING: the Secret is immutable: true; execute refuses")
    for entry in diff.data:
        lines.extend(_render_entry(entry))
    lines.extend(_render_meta("labels", diff.labels))
    lines.extend(_render_meta("annotations", diff.annotations))
    return "\n".join(lines)
