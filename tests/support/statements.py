"""Counting the SQL statements a block of code sends (no N+1 checks, bench.scale)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, event

__all__ = ["counted"]


@contextmanager
def counted(engine: Engine) -> Iterator[Counter[str]]:
    """Count the statements sent through ``engine`` in the block (an executemany is one)."""
    seen: Counter[str] = Counter()

    def count(*_: object) -> None:
        seen["statements"] += 1

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)
