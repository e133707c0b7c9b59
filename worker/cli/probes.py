"""``certautopilot probe``: liveness and readiness for Kubernetes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.common import new_typer, say
from worker.cli.context import settings
from worker.cli.errors import EXIT_FAILED, fail, handled

if TYPE_CHECKING:
    from worker.platform.settings import Settings

app = new_typer("Liveness and readiness probes for the worker (Kubernetes).")


@app.command("liveness")
@handled
def liveness() -> None:
    """Exit 0 when the worker's heartbeat file is fresh (younger than 3 reaper intervals)."""
    loaded = settings()
    path = loaded.tasks.heartbeat_file
    limit = 3 * loaded.tasks.reaper_interval
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        fail(f"not alive: no heartbeat file {path} (has the worker started?)", EXIT_FAILED)
    if age > limit:
        fail(f"not alive: heartbeat {path} is {age:.0f}s old (limit {limit:.0f}s)", EXIT_FAILED)
    say(f"alive: heartbeat {age:.0f}s old (limit {limit:.0f}s)")


@app.command("readiness")
@handled
def readiness(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per check.", min=0.1)] = 5.0,
) -> None:
    """Exit 0 when the database answers at the current schema and the broker is reachable."""
    loaded = settings()
    problems = [
        problem
        for problem in (_database_problem(loaded), _broker_problem(loaded, timeout))
        if problem is not None
    ]
    if problems:
        fail("not ready: " + "; ".join(problems), EXIT_FAILED)
    say("ready: database at the current schema, broker reachable")


def _database_problem(settings: Settings) -> str | None:
    """Why the database is not usable by the workers, or None."""
    from sqlalchemy.exc import SQLAlchemyError

    from models import migrate
    from worker.platform.db import DatabaseUrlError, make_engine
    from worker.platform.redaction import redact_url

    try:
        engine = make_engine(settings.database.url)
        try:
            # Reading the schema revision is the round trip that proves the database answers.
            current, head = migrate.current(engine), migrate.head()
        finally:
            engine.dispose()
    except (SQLAlchemyError, DatabaseUrlError, migrate.MigrationError, OSError) as exc:
        return f"database {redact_url(settings.database.url)} unreachable: {exc}"
    if current != head:
        return (
            f"database schema is {current or '(empty)'}, expected {head}: run "
            "`certautopilot migrate`"
        )
    return None


def _broker_problem(settings: Settings, timeout: float) -> str | None:
    """Why the broker cannot be reached, or None."""
    from kombu.connection import Connection
    from kombu.exceptions import KombuError

    from worker.platform.redaction import redact_url

    broker = Connection(  # type: ignore[no-untyped-call]
        settings.broker.url,
        connect_timeout=timeout,
        transport_options={"visibility_timeout": settings.broker.visibility_timeout},
    )
    try:
        broker.ensure_connection(max_retries=1, timeout=timeout)  # type: ignore[no-untyped-call]
    except (KombuError, OSError) as exc:
        return f"broker {redact_url(settings.broker.url)} unreachable: {exc}"
    finally:
        broker.release()  # type: ignore[no-untyped-call]
    return None
