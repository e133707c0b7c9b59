"""Rollback snapshots: the Secret as it was before our first landed write, sealed.

The sealed content is the JSON of ``worker.core.snapshot.PreviousSecret.to_dict()``; the
models take and return it as a plain mapping. Snapshots sealed before that type existed hold
the same keys without ``"existed"`` (only existing Secrets have content), which
``PreviousSecret.from_dict`` reads as True.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.base import new_id, utcnow
from models.entities import Distribution, RollbackSnapshot, TargetGroupMember
from models.errors import NotFoundError
from models.sealing import Sealer

__all__ = [
    "distribution_snapshot",
    "get_snapshot",
    "make_snapshot_provisional",
    "record_snapshot_write",
    "reveal_snapshot",
    "save_snapshot",
]

_PREVIOUS = {"table": RollbackSnapshot.__tablename__, "purpose": "previous"}


def save_snapshot(
    session: Session,
    sealer: Sealer,
    *,
    distribution_id: str,
    target_id: str,
    previous: Mapping[str, Any],
    taken_at: datetime | None = None,
    replace_provisional: bool = True,
) -> bool:
    """Keep the Secret as it is before our write; True if this call stored it.

    ``replace_provisional=False`` only inserts (the live Secret is this distribution's write of
    another certificate, so a provisional snapshot is kept).

    A snapshot is *provisional* until :func:`record_snapshot_write` says our write landed, and
    *final* after that. A provisional one is replaced by what is live at the next attempt (a
    write that failed changed nothing, and the owner may have changed the Secret since); a
    final one is never replaced, so a redelivered write cannot snapshot our own content.

    ``previous`` is ``PreviousSecret.to_dict()``; it is sealed only when the Secret existed.
    The first insert is ``ON CONFLICT DO NOTHING`` on the (distribution, target) unique key,
    so of two concurrent first attempts exactly one inserts; the other then replaces it only
    while it is still provisional (under the row lock on PostgreSQL).
    """
    existing = _locked_snapshot(session, distribution_id, target_id)
    if existing is None:
        row_id = new_id()
        values = {
            "id": row_id,
            "distribution_id": distribution_id,
            "target_id": target_id,
            "existed": bool(previous["existed"]),
            "previous": _seal(sealer, row_id, previous),
            "taken_at": taken_at or utcnow(),
        }
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = (
            insert(RollbackSnapshot)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["distribution_id", "target_id"])
            # RETURNING tells reliably whether this statement inserted: rowcount of an ORM
            # insert is not dependable across drivers.
            .returning(RollbackSnapshot.id)
        )
        if session.execute(statement).scalar_one_or_none() is not None:
            return True
        existing = _locked_snapshot(session, distribution_id, target_id)
        assert existing is not None  # the conflicting row
    if existing.written_fingerprint is not None or not replace_provisional:
        return False
    # The sealed content stays bound to the row's own id (associated data).
    existing.existed = bool(previous["existed"])
    existing.previous = _seal(sealer, existing.id, previous)
    existing.taken_at = taken_at or utcnow()
    session.flush()
    return True


def _seal(sealer: Sealer, row_id: str, previous: Mapping[str, Any]) -> bytes | None:
    if not previous["existed"]:
        return None
    clear = json.dumps(dict(previous), sort_keys=True).encode("utf-8")
    return sealer.seal(clear, row_id=row_id, **_PREVIOUS)


def _locked_snapshot(
    session: Session, distribution_id: str, target_id: str
) -> RollbackSnapshot | None:
    query = (
        select(RollbackSnapshot)
        .where(
            RollbackSnapshot.distribution_id == distribution_id,
            RollbackSnapshot.target_id == target_id,
        )
        # SQLite ignores FOR UPDATE; there BEGIN IMMEDIATE already serialises writers.
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).one_or_none()


def make_snapshot_provisional(session: Session, distribution_id: str, target_id: str) -> None:
    """After a rollback put the snapshot back: the next execute snapshots what is live then.

    The owner may change the restored Secret before our next write; a second rollback must
    never bring back a state older than the one that write replaced.
    """
    snapshot = _locked_snapshot(session, distribution_id, target_id)
    if snapshot is not None:
        snapshot.written_fingerprint = None
        snapshot.written_resource_version = None
        snapshot.written_at = None
        session.flush()


def get_snapshot(session: Session, distribution_id: str, target_id: str) -> RollbackSnapshot | None:
    """The snapshot row for (distribution, target), or None (still sealed)."""
    query = select(RollbackSnapshot).where(
        RollbackSnapshot.distribution_id == distribution_id,
        RollbackSnapshot.target_id == target_id,
    )
    return session.scalars(query).one_or_none()


def reveal_snapshot(
    session: Session, sealer: Sealer, distribution_id: str, target_id: str
) -> tuple[RollbackSnapshot, dict[str, Any]]:
    """The snapshot row and its decrypted content (``PreviousSecret.to_dict()`` form).

    NotFoundError when there is none. A Secret that did not exist reads ``{"existed": False}``.
    """
    snapshot = get_snapshot(session, distribution_id, target_id)
    if snapshot is None:
        raise NotFoundError(
            "rollback snapshot", f"{distribution_id}/{target_id}", by="distribution/target"
        )
    if snapshot.previous is None:
        return snapshot, {"existed": False}
    clear = sealer.unseal(snapshot.previous, row_id=snapshot.id, **_PREVIOUS)
    content: dict[str, Any] = json.loads(clear)
    return snapshot, content


def distribution_snapshot(session: Session, distribution: Distribution) -> RollbackSnapshot | None:
    """The snapshot that decides a distribution's Rollback button, in one query.

    Of its current targets' snapshots: the first in fan-out order whose Secret existed,
    else the first at all; None when no target has one.
    """
    query = select(RollbackSnapshot).where(RollbackSnapshot.distribution_id == distribution.id)
    if distribution.target_id is not None:
        query = query.where(RollbackSnapshot.target_id == distribution.target_id)
    elif distribution.group_id is not None:
        query = query.join(
            TargetGroupMember,
            (TargetGroupMember.target_id == RollbackSnapshot.target_id)
            & (TargetGroupMember.group_id == distribution.group_id),
        ).order_by(RollbackSnapshot.existed.desc(), TargetGroupMember.position)
    else:
        return None
    return session.scalars(query.limit(1)).first()


def record_snapshot_write(
    session: Session,
    distribution_id: str,
    target_id: str,
    *,
    fingerprint: str,
    resource_version: str | None,
    written_at: datetime | None = None,
) -> bool:
    """Remember what we wrote (for drift detection); False when no snapshot row exists."""
    snapshot = get_snapshot(session, distribution_id, target_id)
    if snapshot is None:
        return False
    snapshot.written_fingerprint = fingerprint
    snapshot.written_resource_version = resource_version
    snapshot.written_at = written_at or utcnow()
    session.flush()
    return True
