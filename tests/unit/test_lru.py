"""The bounded per-process cache behind parsed bundles and diff summaries."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.lru import LruCache


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.get("b") is None


@given(capacity=st.integers(1, 8), keys=st.lists(st.integers(0, 20), max_size=60))
def test_it_never_holds_more_than_its_capacity_and_keeps_the_latest(
    capacity: int, keys: list[int]
) -> None:
    cache: LruCache[int, int] = LruCache(capacity)
    for key in keys:
        cache.put(key, key * 10)
        assert len(cache) <= capacity
        assert cache.get(key) == key * 10


def test_a_zero_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        LruCache(0)


def test_threads_sharing_it_never_break_it() -> None:
    cache: LruCache[int, int] = LruCache(4)
    errors: list[BaseException] = []

    def churn(offset: int) -> None:
        try:
            for i in range(2000):
                cache.put((i + offset) % 9, i)
                cache.get((i * 7 + offset) % 9)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(cache) <= 4
