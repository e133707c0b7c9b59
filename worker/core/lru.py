"""A small least-recently-used map, safe to share between threads.

The per-process caches (parsed bundles, diff summaries) use it; each entry is cheap to
rebuild, so a bounded cache only trades memory for repeated parsing. The eviction is
cachetools' ``LRUCache``; it is not thread-safe (a read reorders entries), hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most ``capacity`` entries; the least recently read or written goes first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._entries: LRUCache[K, V] = LRUCache(maxsize=capacity)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        # A membership test does not count as a use (cachetools does not reorder on it).
        with self._lock:
            return key in self._entries

    def get(self, key: K) -> V | None:
        """The value for ``key`` (now the most recent), or None."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        """Store ``value``, dropping the least recent entries beyond the capacity."""
        with self._lock:
            self._entries[key] = value
