"""Whether a distribution can be rolled back on a target, and why not (the greyed-out button)."""

from __future__ import annotations

from dataclasses import dataclass

from models.entities import Distribution, RollbackSnapshot
from models.enums import DistributionKind

__all__ = [
    "NOTHING_DEPLOYED_YET",
    "NOT_KUBERNETES",
    "PREVIOUSLY_ABSENT",
    "STORE_CONTENT_OFF",
    "Availability",
    "rollback_availability",
]

STORE_CONTENT_OFF = (
    "Rollback is unavailable: 'Store content' was off for this distribution, so the previous "
    "Secret was not captured."
)
NOTHING_DEPLOYED_YET = (
    "Rollback is unavailable: nothing has been written to this target yet, so there is no "
    "previous Secret to restore."
)
PREVIOUSLY_ABSENT = (
    "Rollback is unavailable: the Secret did not exist before CertAutoPilot's first write, and "
    "the module has no delete permission. Delete the Secret by hand if it must go."
)
NOT_KUBERNETES = "Rollback is unavailable: only Kubernetes distributions capture a previous Secret."


@dataclass(frozen=True)
class Availability:
    """Whether the Rollback button is enabled; ``reason`` is its tooltip."""

    available: bool
    reason: str


def rollback_availability(
    distribution: Distribution, snapshot: RollbackSnapshot | None
) -> Availability:
    """Can ``distribution`` be rolled back on the target ``snapshot`` belongs to (or None)?"""
    if distribution.kind != DistributionKind.KUBERNETES:
        return Availability(False, NOT_KUBERNETES)
    # The spec ties the button to the toggle: OFF means greyed out, even if a snapshot
    # survives from a time when the toggle was on.
    if not distribution.store_content:
        return Availability(False, STORE_CONTENT_OFF)
    if snapshot is None:
        return Availability(False, NOTHING_DEPLOYED_YET)
    if snapshot.distribution_id != distribution.id:
        raise ValueError(
            f"snapshot {snapshot.id} belongs to distribution {snapshot.distribution_id}, "
            f"not {distribution.id}"
        )
    if not snapshot.existed:
        return Availability(False, PREVIOUSLY_ABSENT)
    taken = snapshot.taken_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Availability(
        True, f"Restores the Secret as it was before CertAutoPilot's first write ({taken})."
    )
