"""Rollback snapshots: the Secret as it was before our first write, sealed, stored once.

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
    "record_snapshot_write",
    "reveal_snapshot",
    "save_snapshot_if_absent",
]

_PREVIOUS = {"table": RollbackSnapshot.__tablename__, "purpose": "previous"}


def save_snapshot_if_absent(
    session: Session,
    sealer: Sealer,
    *,
    distribution_id: str,
    target_id: str,
    previous: Mapping[str, Any],
    taken_at: datetime | None = None,
) -> bool:
    """Store the previous Secret unless a snapshot exists already; True if this call stored it.

    ``previous`` is ``PreviousSecret.to_dict()``; it is sealed only when the Secret existed.
    Race-safe: the insert is ``ON CONFLICT DO NOTHING`` on the (distribution, target) unique
    key, so of two concurrent deliveries exactly one snapshot wins and the other is a no-op.
    """
    row_id = new_id()
    existed = bool(previous["existed"])
    sealed: bytes | None = None
    if existed:
        clear = json.dumps(dict(previous), sort_keys=True).encode("utf-8")
        sealed = sealer.seal(clear, row_id=row_id, **_PREVIOUS)
    values = {
        "id": row_id,
        "distribution_id": distribution_id,
        "target_id": target_id,
        "existed": existed,
        "previous": sealed,
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
    return session.execute(statement).scalar_one_or_none() is not None


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
