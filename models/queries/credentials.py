"""Credentials: kubeconfigs and webhook HMAC keys, stored sealed."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import new_id
from models.entities import Credential
from models.enums import CredentialKind
from models.errors import InvalidRecordError
from models.queries._common import ensure_unique_name, get_row, get_row_by_name
from models.sealing import Sealer

__all__ = [
    "get_credential",
    "get_credential_by_name",
    "list_credentials",
    "replace_credential_secret",
    "reveal_credential",
    "store_credential",
    "unseal_credential",
]

_SECRET = {"table": Credential.__tablename__, "purpose": "secret"}


def store_credential(
    session: Session,
    sealer: Sealer,
    name: str,
    kind: CredentialKind | str,
    secret_bytes: bytes,
) -> Credential:
    """Insert a module credential; ``secret_bytes`` (e.g. a kubeconfig) are sealed."""
    ensure_unique_name(session, Credential, name, "credential")
    if not secret_bytes:
        raise InvalidRecordError(f"credential {name!r}: the secret is empty; paste the kubeconfig")
    row_id = new_id()
    credential = Credential(
        id=row_id,
        name=name,
        kind=CredentialKind(kind),
        secret=sealer.seal(secret_bytes, row_id=row_id, **_SECRET),
    )
    session.add(credential)
    session.flush()
    return credential


def replace_credential_secret(
    session: Session, sealer: Sealer, credential_id: str, secret_bytes: bytes
) -> Credential:
    """Replace a credential's secret (e.g. a renewed kubeconfig), sealed under the current KEK."""
    credential = get_credential(session, credential_id)
    if not secret_bytes:
        raise InvalidRecordError(f"credential {credential.name!r}: the new secret is empty")
    credential.secret = sealer.seal(secret_bytes, row_id=credential.id, **_SECRET)
    session.flush()
    return credential


def get_credential(session: Session, credential_id: str) -> Credential:
    """The credential with this id, or NotFoundError."""
    return get_row(session, Credential, credential_id, "credential")


def get_credential_by_name(session: Session, name: str) -> Credential:
    """The credential with this name, or NotFoundError."""
    return get_row_by_name(session, Credential, name, "credential")


def list_credentials(session: Session) -> list[Credential]:
    """All credentials by name (secrets stay sealed)."""
    return list(session.scalars(select(Credential).order_by(Credential.name)))


def reveal_credential(session: Session, sealer: Sealer, credential_id: str) -> bytes:
    """The credential's secret bytes, decrypted (only for the connection code)."""
    credential = get_credential(session, credential_id)
    return unseal_credential(sealer, credential.id, credential.secret)


def unseal_credential(sealer: Sealer, credential_id: str, sealed: bytes) -> bytes:
    """Decrypt a credential's sealed secret already read (e.g. with a claim), without a query."""
    return sealer.unseal(sealed, row_id=credential_id, **_SECRET)
