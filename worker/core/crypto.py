"""Envelope encryption for secrets at rest (private keys, kubeconfigs, rollback snapshots).

Every stored secret gets its own fresh 256-bit data key (DEK). The payload is encrypted with
AES-256-GCM under the DEK; the DEK is itself encrypted ("wrapped") with AES-256-GCM under a
key-encryption key (KEK) from the settings. Several KEKs can be loaded at once, each under a
key id; one of them is *current* and is used for new writes. Key rotation (:func:`rewrap`)
re-wraps only the DEK under another KEK and leaves the payload ciphertext untouched.

Both encryptions carry associated data derived from :class:`SealContext` (table, row id,
purpose), so an envelope copied into another row, or into another column of the same row,
fails to decrypt instead of silently yielding someone else's secret.

Envelope layout, version 1 (all integers big-endian)::

    offset        size  field
    0             4     magic b"CAPE"
    4             1     format version (1)
    5             1     n = length of the key id
    6             n     key id (ASCII, see KEY_ID_PATTERN)
    6+n           12    nonce used to wrap the DEK
    18+n          48    wrapped DEK (32 bytes + 16-byte GCM tag)
    66+n          12    nonce used for the payload
    78+n          rest  payload ciphertext + 16-byte GCM tag

Error tree (messages name the row and the key id, never key material)::

    CryptoError
    ├── UnknownKeyError       the envelope names a KEK id that is not loaded
    └── DecryptionError       wrong KEK, tampered bytes, envelope from another row
        └── MalformedEnvelopeError   not an envelope at all / truncated / unknown version
"""

from __future__ import annotations

import base64
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEK_BYTES",
    "KEY_ID_PATTERN",
    "CryptoError",
    "DecryptionError",
    "Keyring",
    "MalformedEnvelopeError",
    "SealContext",
    "UnknownKeyError",
    "envelope_key_id",
    "generate_kek",
    "is_valid_key_id",
    "rewrap",
    "seal",
    "unseal",
]

KEK_BYTES = 32
"""Length of a key-encryption key in bytes (AES-256)."""

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Key ids are short ASCII tokens so they fit the envelope header and read well in messages."""

_MAGIC = b"CAPE"
_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
_DEK_BYTES = 32
_WRAPPED_DEK_BYTES = _DEK_BYTES + _TAG_BYTES
# Domain-separation labels keep the two AAD strings distinct even for identical contexts.
_WRAP_LABEL = b"certautopilot/envelope/v1/dek"
_PAYLOAD_LABEL = b"certautopilot/envelope/v1/payload"


class CryptoError(Exception):
    """Base class for every envelope-encryption error."""


class UnknownKeyError(CryptoError):
    """The envelope was sealed under a KEK id that is not loaded."""


class DecryptionError(CryptoError):
    """The envelope could not be authenticated: wrong KEK, tampered, or from another row."""


class MalformedEnvelopeError(DecryptionError):
    """The bytes are not a (complete) envelope of a supported version."""


@dataclass(frozen=True)
class SealContext:
    """Where an envelope lives; bound into the ciphertext as associated data."""

    table: str
    row_id: str
    purpose: str

    def __post_init__(self) -> None:
        for name in ("table", "row_id", "purpose"):
            if not getattr(self, name):
                raise ValueError(f"SealContext.{name} must not be empty")

    def describe(self) -> str:
        """Human-readable location used in error messages, e.g. "credentials.secret of row 1f…"."""
        return f"{self.table}.{self.purpose} of row {self.row_id}"

    def to_aad(self) -> bytes:
        """Unambiguous byte encoding (length-prefixed fields) used as associated data."""
        parts = [self.table, self.row_id, self.purpose]
        encoded = b""
        for part in parts:
            raw = part.encode("utf-8")
            encoded += struct.pack(">I", len(raw)) + raw
        return encoded


class _KeyringSettings(Protocol):
    """The slice of worker.platform.settings.Settings that Keyring.from_settings reads."""

    @property
    def crypto(self) -> Any: ...


def is_valid_key_id(key_id: str) -> bool:
    """True when ``key_id`` can be stored in an envelope header."""
    return KEY_ID_PATTERN.fullmatch(key_id) is not None


class Keyring:
    """The loaded KEKs by key id, and which one is current (used for new writes)."""

    __slots__ = ("_ciphers", "current_key_id")

    def __init__(self, keys: Mapping[str, bytes], current_key_id: str | None = None) -> None:
        if not keys:
            raise ValueError("a Keyring needs at least one KEK; set CAP_KEK or CAP_KEK_FILE")
        ciphers: dict[str, AESGCM] = {}
        for key_id, material in keys.items():
            if not is_valid_key_id(key_id):
                raise ValueError(
                    f"KEK id {key_id!r} is invalid: use 1-64 characters of letters, digits, "
                    "'.', '_' or '-', starting with a letter or digit"
                )
            if len(material) != KEK_BYTES:
                # The length is not secret; the material is never echoed.
                raise ValueError(
                    f"KEK {key_id!r} is {len(material)} bytes long; a KEK must be exactly "
                    f"{KEK_BYTES} bytes (base64 of 32 random bytes, e.g. from generate_kek())"
                )
            ciphers[key_id] = AESGCM(material)
        current = current_key_id if current_key_id is not None else next(iter(keys))
        if current not in ciphers:
            raise ValueError(
                f"current KEK id {current!r} is not among the loaded KEKs "
                f"({_quoted(ciphers)}); load it or choose one of those"
            )
        self._ciphers = ciphers
        self.current_key_id = current

    @classmethod
    def from_settings(cls, settings: _KeyringSettings) -> Keyring:
        """Build the keyring from ``settings.crypto`` (worker.platform.settings.CryptoSettings)."""
        crypto = settings.crypto
        return cls(crypto.keys, crypto.current_key_id)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every loaded KEK, in load order."""
        return tuple(self._ciphers)

    def has_key(self, key_id: str) -> bool:
        """True when a KEK with this id is loaded."""
        return key_id in self._ciphers

    def _cipher(self, key_id: str, context: SealContext | None) -> AESGCM:
        try:
            return self._ciphers[key_id]
        except KeyError:
            where = f" to decrypt {context.describe()}" if context else ""
            raise UnknownKeyError(
                f"no KEK {key_id!r} loaded{where} (loaded: {_quoted(self._ciphers)}); "
                f"set CAP_KEK/CAP_KEK_FILE to include the KEK with id {key_id!r}"
            ) from None

    def __repr__(self) -> str:
        return f"Keyring(key_ids={list(self._ciphers)!r}, current_key_id={self.current_key_id!r})"


def _quoted(ids: Mapping[str, object]) -> str:
    return ", ".join(repr(key_id) for key_id in ids) or "none"


def generate_kek() -> str:
    """A new random KEK, base64-encoded, ready for ``CAP_KEK=<id>:<this>``."""
    return base64.b64encode(os.urandom(KEK_BYTES)).decode("ascii")


@dataclass(frozen=True)
class _Parsed:
    key_id: str
    header: bytes  # magic + version + key id; authenticated as part of the wrap AAD
    wrap_nonce: bytes
    wrapped_dek: bytes
    payload: bytes  # payload nonce + ciphertext + tag, never modified by rewrap


def _parse(envelope: bytes, context: SealContext | None) -> _Parsed:
    where = f" for {context.describe()}" if context else ""
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise MalformedEnvelopeError(
            f"stored value{where} is {type(envelope).__name__}, not envelope bytes"
        )
    envelope = bytes(envelope)
    if envelope[:4] != _MAGIC:
        raise MalformedEnvelopeError(
            f"stored value{where} is not a CertAutoPilot envelope (bad magic bytes); "
            "it was not written by seal() or is corrupted"
        )
    if len(envelope) < 6:
        raise MalformedEnvelopeError(f"envelope{where} is truncated (header incomplete)")
    version = envelope[4]
    if version != _VERSION:
        raise MalformedEnvelopeError(
            f"envelope{where} has format version {version}; this worker reads version "
            f"{_VERSION} (upgrade the worker, or the value is corrupted)"
        )
    id_len = envelope[5]
    minimum = 6 + id_len + _NONCE_BYTES + _WRAPPED_DEK_BYTES + _NONCE_BYTES + _TAG_BYTES
    if id_len == 0 or len(envelope) < minimum:
        raise MalformedEnvelopeError(
            f"envelope{where} is truncated ({len(envelope)} bytes, need at least {minimum})"
        )
    try:
        key_id = envelope[6 : 6 + id_len].decode("ascii")
    except UnicodeDecodeError:
        key_id = ""
    if not is_valid_key_id(key_id):
        raise MalformedEnvelopeError(f"envelope{where} carries an invalid key id; it is corrupted")
    offset = 6 + id_len
    wrap_nonce = envelope[offset : offset + _NONCE_BYTES]
    offset += _NONCE_BYTES
    wrapped_dek = envelope[offset : offset + _WRAPPED_DEK_BYTES]
    offset += _WRAPPED_DEK_BYTES
    return _Parsed(
        key_id=key_id,
        header=envelope[: 6 + id_len],
        wrap_nonce=wrap_nonce,
        wrapped_dek=wrapped_dek,
        payload=envelope[offset:],
    )


def _header(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return _MAGIC + bytes([_VERSION, len(raw)]) + raw


def _wrap_aad(header: bytes, context: SealContext) -> bytes:
    # The header (and so the key id) is authenticated: relabelling an envelope with another
    # key id, or moving it to another row, breaks the unwrap.
    return _WRAP_LABEL + header + context.to_aad()


def _payload_aad(context: SealContext) -> bytes:
    # Deliberately independent of the key id, so rewrap never has to touch the payload.
    return _PAYLOAD_LABEL + context.to_aad()


def _unwrap_dek(keyring: Keyring, parsed: _Parsed, context: SealContext) -> bytes:
    cipher = keyring._cipher(parsed.key_id, context)
    try:
        return cipher.decrypt(
            parsed.wrap_nonce, parsed.wrapped_dek, _wrap_aad(parsed.header, context)
        )
    except InvalidTag as exc:
        raise DecryptionError(
            f"cannot decrypt {context.describe()} with KEK {parsed.key_id!r}: the data key "
            "does not authenticate. Either the KEK loaded under that id is not the one that "
            "sealed it (restore the original CAP_KEK/CAP_KEK_FILE value), or the stored "
            "value was modified or copied from another row"
        ) from exc


def _wrap_dek(keyring: Keyring, dek: bytes, key_id: str, context: SealContext) -> bytes:
    header = _header(key_id)
    nonce = os.urandom(_NONCE_BYTES)
    wrapped = keyring._cipher(key_id, None).encrypt(nonce, dek, _wrap_aad(header, context))
    return header + nonce + wrapped


def seal(keyring: Keyring, plaintext: bytes, context: SealContext) -> bytes:
    """Encrypt ``plaintext`` under a fresh data key wrapped by the current KEK."""
    dek = AESGCM.generate_key(bit_length=_DEK_BYTES * 8)
    payload_nonce = os.urandom(_NONCE_BYTES)
    payload = payload_nonce + AESGCM(dek).encrypt(
        payload_nonce, bytes(plaintext), _payload_aad(context)
    )
    return _wrap_dek(keyring, dek, keyring.current_key_id, context) + payload


def unseal(keyring: Keyring, envelope: bytes, context: SealContext) -> bytes:
    """Decrypt an envelope written by :func:`seal` for the same ``context``."""
    parsed = _parse(envelope, context)
    dek = _unwrap_dek(keyring, parsed, context)
    nonce, ciphertext = parsed.payload[:_NONCE_BYTES], parsed.payload[_NONCE_BYTES:]
    try:
        return AESGCM(dek).decrypt(nonce, ciphertext, _payload_aad(context))
    except InvalidTag as exc:
        raise DecryptionError(
            f"cannot decrypt {context.describe()} (KEK {parsed.key_id!r}): the payload does "
            "not authenticate; the stored value was modified or copied from another row. "
            "Re-enter the secret or restore the row from a backup"
        ) from exc


def envelope_key_id(envelope: bytes) -> str:
    """The id of the KEK that wraps this envelope's data key."""
    return _parse(envelope, None).key_id


def rewrap(
    keyring: Keyring, envelope: bytes, context: SealContext, to_key_id: str | None = None
) -> bytes:
    """Re-wrap the data key under ``to_key_id`` (default: current KEK); the payload is untouched."""
    target = keyring.current_key_id if to_key_id is None else to_key_id
    if not keyring.has_key(target):
        raise UnknownKeyError(
            f"cannot re-wrap {context.describe()} under KEK {target!r}: it is not loaded "
            f"(loaded: {_quoted(dict.fromkeys(keyring.key_ids))}); add it to CAP_KEK/CAP_KEK_FILE"
        )
    parsed = _parse(envelope, context)
    dek = _unwrap_dek(keyring, parsed, context)
    return _wrap_dek(keyring, dek, target, context) + parsed.payload
