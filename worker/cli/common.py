"""What the command groups share: how a group is made, the common options, printing a message
or a listing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from worker.cli.context import runtime
from worker.cli.output import OutputFormat, emit, make_console, plain

if TYPE_CHECKING:
    from worker.platform.runtime import Runtime

__all__ = [
    "NoWaitOption",
    "OutputOption",
    "TimeoutOption",
    "list_rows",
    "new_typer",
    "now",
    "print_table",
    "say",
]


def new_typer(help_text: str, **options: Any) -> typer.Typer:
    """A typer app (the root or a command group) configured like every other one.

    ``rich_markup_mode=None``: click's plain help layout. Typer's rich help panels print a
    ``<bool>`` type after every flag (``--dry-run <bool>``, even ``--help <bool>``), which reads
    as if the flag took a value; the plain layout shows flags bare and the other options' types.
    """
    return typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode=None, **options)


OutputOption = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        help="table (for people; 'text' is the same), json or yaml (every value, status codes "
        "as stored), or name (the ids only, one per line).",
    ),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", help="Seconds to follow the run before giving up.", min=1)
]
NoWaitOption = Annotated[
    bool, typer.Option("--no-wait", help="Queue the run and return its id at once.")
]


def now() -> datetime:
    return datetime.now(UTC)


def say(message: str | Text) -> None:
    """Print a message on stdout, shown literally (names in it are never markup)."""
    make_console().print(message)


def print_table(table: Table) -> None:
    make_console().print(table)


def list_rows(
    output: OutputFormat,
    fetch: Callable[[Runtime], Sequence[Any]],
    columns: Sequence[str],
    cells: Callable[[Any], Sequence[str | Text]],
) -> None:
    """Fetch rows with a fresh runtime and print them as JSON or as a table."""
    with runtime() as rt:
        rows = fetch(rt)
    if output.machine:
        emit(output, rows)
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else plain(cell) for cell in cells(row)))
    print_table(table)
