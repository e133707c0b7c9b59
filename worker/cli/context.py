"""What a command runs on: the settings from the environment, the schema check, the runtime.

The CLI is a composition root: each command reads the settings from the environment once
(:func:`worker.platform.settings.load_settings`), builds the process runtime and calls
:mod:`worker.app.service`. With the embedded default (nothing configured) the database schema
is created on first use, so the quickstart works on a fresh machine; any other database is
migrated explicitly with ``certautopilot migrate``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from worker.cli.errors import EXIT_FAILED, CliError
from worker.cli.output import make_console

if TYPE_CHECKING:
    from worker.app.runs import Dispatcher
    from worker.platform.runtime import Runtime
    from worker.platform.settings import Settings

__all__ = ["celery_dispatcher", "ensure_schema", "runtime", "settings"]


def settings() -> Settings:
    """The settings from this process's environment, warning about unknown CAP_* variables."""
    from worker.platform.bootstrap import bootstrap
    from worker.platform.settings import load_settings

    # The bootstrap creates the embedded default's folder and KEK (nothing otherwise).
    loaded = bootstrap(load_settings(os.environ))
    if loaded.ignored_variables:
        message = (
            "ignoring unknown setting(s) "
            + ", ".join(loaded.ignored_variables)
            + " (typo? see the configuration reference in the README)"
        )
        if loaded.observability.log_format == "json":  # a log shipper reads every line
            import logging

            from worker.platform.logs import write_json_line

            write_json_line(logging.WARNING, "worker.cli", message)
        else:
            make_console(stderr=True).print("warning: " + message)
    return loaded


def ensure_schema(settings: Settings) -> None:
    """Create/upgrade the embedded default's schema; refuse other databases that lag behind."""
    from models import migrate
    from worker.platform.redaction import redact_url
    from worker.platform.runtime import migration_engine

    with migration_engine(settings.database.url) as engine:
        current, head = migrate.current(engine), migrate.head()
        if current == head:
            return
        if settings.database.is_default:
            migrate.upgrade(engine)
    if settings.database.is_default:
        make_console(stderr=True).print(
            f"initialised the embedded database {redact_url(settings.database.url)} (schema {head})"
        )
        return
    raise CliError(
        f"the database {redact_url(settings.database.url)} is at schema "
        f"{current or '(empty)'} but this version needs {head}; run `certautopilot migrate`",
        EXIT_FAILED,
    )


@contextmanager
def runtime() -> Iterator[Runtime]:
    """The process runtime for one command (schema checked), closed afterwards."""
    from worker.platform.runtime import build_runtime, set_runtime

    loaded = settings()
    ensure_schema(loaded)
    rt = build_runtime(loaded)
    set_runtime(rt)
    try:
        yield rt
    finally:
        set_runtime(None)
        rt.close()


def celery_dispatcher(settings: Settings) -> Dispatcher:
    """The Celery dispatcher, publishing to the broker named by ``settings``."""
    from tasks.distribution import dispatcher
    from worker.platform.celery_app import app as celery_app
    from worker.platform.celery_app import configure

    # The Celery app reads no settings by itself: publish exactly where these settings say.
    configure(celery_app, settings)
    return dispatcher
