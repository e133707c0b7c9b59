"""Every test in this folder needs the real test environment: mark it ``integration``.

``pytest -m "not integration"`` then selects exactly the unit tests, without each module
having to remember the marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
