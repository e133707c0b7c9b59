"""Running the service: ``certautopilot migrate``, ``worker`` and ``flower``."""

from __future__ import annotations

import logging
import os
import sys
from enum import StrEnum
from typing import Annotated

import typer

from worker.cli.common import say
from worker.cli.context import celery_dispatcher, ensure_schema, settings
from worker.cli.errors import CliError, handled


@handled
def migrate() -> None:
    """Create or upgrade the database schema (run once per release, before the workers)."""
    from models import migrate as migrations
    from worker.platform.redaction import redact_url
    from worker.platform.runtime import migration_engine

    loaded = settings()
    with migration_engine(loaded.database.url) as engine:
        before = migrations.current(engine)
        migrations.upgrade(engine)
        after = migrations.current(engine)
    say(
        f"database {redact_url(loaded.database.url)}: schema {before or '(empty)'} -> {after}"
        if before != after
        else f"database {redact_url(loaded.database.url)}: already at schema {after}"
    )


class LogLevel(StrEnum):
    """Worker log levels."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


@handled
def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", help="Worker processes (default CAP_WORKER_CONCURRENCY).", min=1
        ),
    ] = None,
    loglevel: Annotated[
        LogLevel | None, typer.Option("--loglevel", help="Default CAP_LOG_LEVEL.")
    ] = None,
    hostname: Annotated[
        str,
        typer.Option(
            "--hostname",
            help="Node name in Flower and remote control; must be unique per worker "
            "(%h = host name, the pod name on Kubernetes).",
        ),
    ] = "certautopilot@%h",
) -> None:
    """Run a Celery worker of pool CAP_WORKER_POOL: its pool's queue and the control queue.

    \b
    Examples:
      certautopilot migrate && certautopilot worker --concurrency 8
      CAP_LOG_FORMAT=json CAP_METRICS_PORT=9808 certautopilot worker
    """
    from worker.platform import logs, metrics
    from worker.platform.celery_app import app as celery_app
    from worker.platform.celery_app import worker_queues
    from worker.platform.settings import require_kek

    loaded = settings()
    require_kek(loaded)  # a worker opens keys and kubeconfigs: it needs the KEK
    metrics.check_port_free(loaded.observability)
    ensure_schema(loaded)
    celery_dispatcher(loaded)  # the app must use exactly these settings
    log_format = loaded.observability.log_format
    logs.warnings_as_json(log_format)
    argv = [
        # JSON logs: no ASCII banner on stdout, so every line a log shipper reads is JSON.
        *(["--quiet"] if log_format == "json" else []),
        "worker",
        f"--queues={','.join(worker_queues(loaded))}",
        "--task-events",
        f"--concurrency={concurrency or loaded.tasks.worker_concurrency}",
        f"--loglevel={(loglevel or loaded.tasks.log_level)}",
        f"--hostname={hostname}",
        # Nothing here uses worker-to-worker gossip or start-up state sync; without them a
        # worker starts faster and sends fewer broker messages (remote control stays on).
        "--without-mingle",
        "--without-gossip",
    ]
    code = celery_app.start(argv)
    # Warm shutdown has finished every task by now. What is left is billiard's atexit
    # finalizer, which terminates the pool and can block forever on the job queue's lock when
    # a pool child was killed while holding it (celery/billiard#457): a pod would then sit in
    # Terminating until SIGKILL. Flush and leave without running finalizers.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


@handled
def flower(
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option("--address", help="Address to bind.")] = "127.0.0.1",
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Start without authentication (trusted host only).")
    ] = False,
) -> None:
    """Start Flower against the workers' broker (basic auth from FLOWER_BASIC_AUTH)."""
    from worker.platform.celery_app import app as celery_app

    loaded = settings()
    if not no_auth and loaded.flower.basic_auth is None:
        raise CliError(
            "refusing to start Flower without authentication: set FLOWER_BASIC_AUTH=user:password "
            "or FLOWER_BASIC_AUTH_FILE=/path/to/file, or pass --no-auth explicitly on a "
            "trusted host"
        )
    if loaded.flower.basic_auth is not None:
        # Flower reads its login from this process's environment (never from argv, which
        # other users can see); the _FILE form is resolved into it here.
        os.environ["FLOWER_BASIC_AUTH"] = loaded.flower.basic_auth
    celery_dispatcher(loaded)
    celery_app.start(["flower", f"--port={port}", f"--address={address}"])
