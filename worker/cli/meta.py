"""About the CLI itself: ``--version``, ``version``, ``completion`` and the global options.

Like kubectl and helm: ``certautopilot --version`` prints one line, ``certautopilot version``
the versions that matter when reporting a problem (with ``-o json|yaml``), and
``certautopilot completion bash|zsh|fish`` prints a completion script. None of them needs a
KEK; ``version`` reads the database's schema revision when a database is configured and
reachable and says ``unknown`` (with why) otherwise, without failing.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import typer

from worker.cli.common import OutputOption
from worker.cli.output import ColorMode, OutputFormat, emit, make_console, set_color_mode

__all__ = ["COMPLETE_VAR", "PROG", "completion", "package_version", "root_options", "version"]

PROG = "certautopilot"
COMPLETE_VAR = "_CERTAUTOPILOT_COMPLETE"
"""The environment variable a completion script sets when it asks for completions."""


def package_version() -> str:
    """The installed distribution's version (``unknown`` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("certautopilot-k8s")
    except PackageNotFoundError:
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        make_console().print(f"{PROG} {package_version()}")
        raise typer.Exit()


def root_options(
    color: Annotated[
        ColorMode,
        typer.Option(
            "--color",
            help="Colour and table borders: auto (on a terminal only; piped output is plain), "
            "always, never. NO_COLOR=1 also turns colour off.",
        ),
    ] = ColorMode.AUTO,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_show_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """The global options (the root help text and its examples are in main.py)."""
    set_color_mode(color)


@dataclass(frozen=True)
class VersionInfo:
    """What ``certautopilot version`` reports."""

    certautopilot: str
    celery: str
    kubernetes_client: str
    python: str
    schema_revision: str
    """The database's Alembic revision, or ``unknown (why)``."""
    schema_head: str
    """The revision this version of the worker needs."""


def _schema_revision() -> str:
    """The database's revision; ``unknown (...)`` when none is configured or it cannot answer."""
    from models import migrate
    from worker.platform.settings import SettingsError, load_settings

    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        return f"unknown (settings: {exc})"
    if settings.database.is_default and not (settings.data_dir / "certautopilot.db").exists():
        return "unknown (no database yet: the embedded default creates it on first use)"
    from worker.platform.db import make_engine

    try:
        engine = make_engine(settings.database.url)
        try:
            current = migrate.current(engine)
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable": say so, do not fail
        return f"unknown (database unreachable: {type(exc).__name__})"
    return current or "unknown (empty database: run `certautopilot migrate`)"


def version(output: OutputOption = OutputFormat.TABLE) -> None:
    """Print the versions of certautopilot, Celery, the Kubernetes client and the schema.

    \b
    Examples:
      certautopilot version
      certautopilot version -o json
    """
    import celery
    import kubernetes

    from models import migrate

    info = VersionInfo(
        certautopilot=package_version(),
        celery=str(celery.__version__),
        kubernetes_client=str(kubernetes.__version__),
        python=platform.python_version(),
        schema_revision=_schema_revision(),
        schema_head=migrate.head(),
    )
    if output is OutputFormat.NAME:
        typer.echo(info.certautopilot)
        return
    if output.machine:
        emit(output, info)
        return
    console = make_console()
    rows: dict[str, Any] = {
        "certautopilot": info.certautopilot,
        "celery": info.celery,
        "kubernetes client": info.kubernetes_client,
        "python": info.python,
        "schema revision": f"{info.schema_revision} (this version needs {info.schema_head})",
    }
    for label, value in rows.items():
        console.print(f"{label + ':':<19}{value}")


class Shell(StrEnum):
    """Shells with a completion script."""

    BASH = "bash"
    ZSH = "zsh"
    FISH = "fish"


def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script.

    \b
    Examples:
      source <(certautopilot completion bash)
      certautopilot completion zsh > "${fpath[1]}/_certautopilot"
      certautopilot completion fish > ~/.config/fish/completions/certautopilot.fish
    """
    from typer._completion_shared import get_completion_script

    script = get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell.value)
    typer.echo(script)
