"""A group's fan-out settings as typed values (worker.core.fanout), read where a run is planned
or advanced and where a group is shown; the settings defaults fill in what the group leaves
unset. Values were validated when the group was created (commands.create_group)."""

from __future__ import annotations

from dataclasses import dataclass

from models.entities import TargetGroup
from worker.core.fanout import (
    BatchSize,
    FailureThreshold,
    parse_batch_size,
    parse_failure_threshold,
)
from worker.platform.runtime import Runtime

__all__ = ["GroupFanout", "group_fanout"]


@dataclass(frozen=True)
class GroupFanout:
    """Batch size and failure threshold in effect for a group (or a single target)."""

    batch_size: BatchSize
    threshold: FailureThreshold
    batch_size_is_default: bool
    threshold_is_default: bool


def group_fanout(rt: Runtime, group: TargetGroup | None) -> GroupFanout:
    """The group's fan-out (``None``: a single target, which uses the defaults)."""
    defaults = rt.settings.fanout
    batch_value = group.batch_size if group is not None else None
    threshold_value = group.failure_threshold if group is not None else None
    return GroupFanout(
        batch_size=parse_batch_size(
            defaults.default_batch_size if batch_value is None else batch_value
        ),
        threshold=parse_failure_threshold(
            defaults.default_failure_threshold if threshold_value is None else threshold_value
        ),
        batch_size_is_default=batch_value is None,
        threshold_is_default=threshold_value is None,
    )
