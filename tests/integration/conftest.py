"""Every test in this folder needs the real test environment: mark it ``integration``.

``pytest -m "not integration"`` then selects exactly the unit tests, without each module
having to remember the marker. The ``pipe`` fixture is the usual pipeline (a fresh PostgreSQL
database, the session's Redis flushed); a module may define its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.pipeline import Pipeline, pipeline

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def pipe(
    postgres_url: str, redis_url: str, redis_server: Any, tmp_path: Path
) -> Iterator[Pipeline]:
    """A pipeline on a fresh database and an empty Redis; its workers stop with the test."""
    redis.Redis.from_url(redis_url).flushdb()
    with pipeline(postgres_url, redis_url, tmp_path) as made:
        yield made
