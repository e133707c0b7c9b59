"""Key rotation: which KEK wraps each stored envelope, and re-wrapping them under another."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.base import Base
from models.entities import Certificate, CertificateRevision, Credential, RollbackSnapshot
from models.sealing import Sealer

__all__ = ["ENVELOPE_COLUMNS", "envelope_key_usage", "rotate_keys"]

ENVELOPE_COLUMNS: tuple[tuple[type[Base], str], ...] = (
    (Certificate, "private_key"),
    (CertificateRevision, "private_key"),
    (Credential, "secret"),
    (RollbackSnapshot, "previous"),
)
"""Every column holding a sealed envelope; key rotation walks exactly these. The column name
is the envelope's purpose (see models.sealing)."""

#: Envelopes sealed for another row than the one holding them: (table, column that holds the
#: owner's id). A revision keeps a copy of its certificate's key envelope.
_SEALED_FOR: dict[type[Base], tuple[type[Base], str]] = {
    CertificateRevision: (Certificate, "certificate_id"),
}


def _envelopes(session: Session) -> Iterable[tuple[type[Base], str, str, str, str, bytes]]:
    """(model, column, row id, sealed-for table, sealed-for row id, envelope) of every envelope."""
    for model, column in ENVELOPE_COLUMNS:
        id_col = model.id  # type: ignore[attr-defined]
        value_col = getattr(model, column)
        owner, owner_column = _SEALED_FOR.get(model, (model, "id"))
        query = (
            select(id_col, getattr(model, owner_column), value_col)
            .where(value_col.is_not(None))
            .order_by(id_col)
        )
        for row_id, owner_id, envelope in session.execute(query):
            yield model, column, row_id, owner.__tablename__, owner_id, envelope


def envelope_key_usage(session: Session, sealer: Sealer) -> Counter[str]:
    """How many stored envelopes each KEK id wraps (to see what a rotation still has to do)."""
    return Counter(sealer.key_id(envelope) for *_, envelope in _envelopes(session))


def rotate_keys(session: Session, sealer: Sealer, to_key_id: str) -> int:
    """Re-wrap every envelope not yet under ``to_key_id``; returns the count.

    Only the wrapped data keys change; payload ciphertexts are untouched. Idempotent and
    resumable: rows already under the target KEK are skipped. The caller checks that
    ``to_key_id`` is loaded (worker.app.commands.rotate_keys).
    """
    pending = [entry for entry in _envelopes(session) if sealer.key_id(entry[-1]) != to_key_id]
    for model, column, row_id, sealed_table, sealed_row_id, envelope in pending:
        rewrapped = sealer.rewrap(
            envelope, to_key_id, table=sealed_table, row_id=sealed_row_id, purpose=column
        )
        session.execute(
            update(model)
            .where(model.id == row_id)  # type: ignore[attr-defined]
            .values({column: rewrapped})
            .execution_options(synchronize_session=False)
        )
    # Rows already loaded in this session would otherwise keep their old envelope.
    session.expire_all()
    return len(pending)
