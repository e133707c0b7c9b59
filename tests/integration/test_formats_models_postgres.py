"""The output-formats revision and queries on PostgreSQL (the SQLite tests, imported)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from tests.unit.test_formats_models import (  # noqa: F401 - shared tests
    test_a_database_filled_before_the_formats_revision_upgrades_with_every_row_intact,
    test_a_downgrade_below_the_formats_revision_is_refused_while_a_password_exists,
    test_a_target_stores_its_formats_and_takes_only_a_pkcs12_password_credential,
)
from tests.unit.test_models_sqlite import (  # noqa: F401 - fixtures
    bundle,
    engine,
    factory,
    sealer,
    upgrade,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def db_url(postgres_url: str) -> str:
    """A fresh PostgreSQL database, migrated to head (overrides the SQLite fixture)."""
    upgrade(postgres_url)
    return postgres_url


def test_the_shared_tests_really_run_on_postgresql(engine: Engine) -> None:  # noqa: F811
    assert engine.dialect.name == "postgresql"
