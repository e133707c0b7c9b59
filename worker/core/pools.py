"""Worker pools (pure): names, the queue of a pool, and splitting work by pool.

A worker belongs to one pool (``CAP_WORKER_POOL``) and takes per-target work only from that
pool's queue, ``<CAP_KUBE_QUEUE>.<pool>``; a target names the pool that must process it. So
an in-cluster target is written by a worker running in its cluster, and a private API server
is reached from a network that can reach it. Orchestration (start, advance) stays on the
shared control queue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_POOL",
    "POOL_NAME_RULE",
    "PoolNameError",
    "check_pool_name",
    "pool_queue",
    "split_by_pool",
]

DEFAULT_POOL = "default"
"""The pool of a worker that sets none, and of a target saved without ``--pool``."""

#: An RFC 1123 label: it can be a Helm release's value, part of a queue name and a metric label.
_POOL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
POOL_NAME_RULE = (
    "1 to 63 lower-case letters, digits or '-', starting and ending with a letter or digit "
    "(e.g. eu-prod)"
)


class PoolNameError(ValueError):
    """A pool name that is not an RFC 1123 label; the message names the rule."""


def check_pool_name(name: str, *, what: str = "pool") -> str:
    """Return ``name`` if it is a valid pool name, else raise :class:`PoolNameError`."""
    if not isinstance(name, str) or not _POOL.fullmatch(name):
        shown = name if isinstance(name, str) and name.isprintable() else ascii(name)
        raise PoolNameError(f"{what} {shown!r} is not a valid pool name: use {POOL_NAME_RULE}")
    return name


def pool_queue(kube_queue: str, pool: str) -> str:
    """The Celery queue of ``pool``'s per-target work: ``kubernetes.eu-prod``."""
    return f"{kube_queue}.{pool}"


def split_by_pool(target_ids: Iterable[str], pools: Mapping[str, str]) -> dict[str, list[str]]:
    """Group ``target_ids`` by their pool (order kept within a pool, pools in first-seen order).

    A target missing from ``pools`` (deleted meanwhile) goes to :data:`DEFAULT_POOL`, whose
    worker records it as not found instead of the message vanishing.
    """
    split: dict[str, list[str]] = {}
    for target_id in target_ids:
        split.setdefault(pools.get(target_id, DEFAULT_POOL), []).append(target_id)
    return split
