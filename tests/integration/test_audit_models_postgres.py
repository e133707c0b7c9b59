"""The audit's schema revision on PostgreSQL: the SQLite tests of tests/unit/test_audit_models.py,
run against the real server (the CHECK constraints are replaced with ALTER TABLE there)."""

from __future__ import annotations

import pytest

from tests.integration.test_models_postgres import db_url  # noqa: F401 - overrides SQLite's
from tests.unit.test_audit_models import (  # noqa: F401 - fixtures and shared tests
    bundle,
    engine,
    factory,
    sealer,
    test_a_database_filled_before_the_audit_revision_upgrades_with_every_row_intact,
    test_an_audit_takes_no_mutation_lock,
)

pytestmark = pytest.mark.integration
