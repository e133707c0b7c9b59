"""Helpers for the statements that run for every target, built once per process.

Building a statement took more of a worker's CPU than PostgreSQL took to run it (py-spy,
bench/), so the hot statements are module constants. The UPDATEs go to the tables directly,
skipping the ORM's bulk-update bookkeeping (nothing needs the identity map). Every parameter
is typed by its column so SQLite stores what it compares; UPDATE parameters are prefixed
because SQLAlchemy reserves column names for the SET clause.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Table, bindparam

from models.entities import Run, TargetResult

RESULTS = cast(Table, TargetResult.__table__)
RUNS = cast(Table, Run.__table__)


def typed_param(name: str, column: Any) -> Any:
    """A bind parameter typed like ``column``."""
    return bindparam(name, type_=column.type)
