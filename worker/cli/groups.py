"""``certautopilot groups``: targets fanned out in batches with a failure threshold."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from worker.cli.common import OutputOption, list_rows, new_typer, say
from worker.cli.context import runtime
from worker.cli.errors import handled
from worker.cli.inputs import variables
from worker.cli.output import OutputFormat, emit

app = new_typer("Target groups: fan out over many targets in batches.")


def _require_serving_words(required: bool) -> str:
    if required:
        return "yes (a target whose endpoints do not serve the new certificate fails)"
    return "no"


def _print_group(view: Any, output: OutputFormat) -> None:
    if output.machine:
        emit(output, view)
        return
    say(
        f"group {view.name!r} (id {view.id})\n"
        f"  batch size:        {view.batch_size}\n"
        f"  failure threshold: {view.failure_threshold} (the run halts when failures exceed it)\n"
        f"  require serving:   {_require_serving_words(view.require_serving)}\n"
        f"  targets:           {', '.join(view.targets) or '(none)'}"
    )
    for index, batch in enumerate(view.batches, start=1):
        say(f"  batch {index}: {', '.join(batch)}")


@app.command("create")
@handled
def create(
    name: Annotated[str, typer.Argument(help="Group name.")],
    target: Annotated[
        list[str], typer.Option("--target", help="Member target, in fan-out order (repeatable).")
    ],
    batch_size: Annotated[
        str | None,
        typer.Option("--batch-size", help='Targets per batch: 5, 25% or progressive "1,5,20%".'),
    ] = None,
    failure_threshold: Annotated[
        str | None,
        typer.Option("--failure-threshold", help="Failures tolerated: a count (2) or 10%."),
    ] = None,
    var: Annotated[
        list[str] | None, typer.Option("--var", help="Template variable name=value (repeatable).")
    ] = None,
    require_serving: Annotated[
        bool,
        typer.Option(
            "--require-serving",
            help="A target whose --verify-serving endpoints do not present the new certificate "
            "by their deadline counts as failed (not_serving) for the failure threshold.",
        ),
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Create a group of targets with its batch size and failure threshold.

    \b
    Examples:
      certautopilot groups create fleet --target edge-eu --target edge-us \\
        --batch-size 1,5,20% --failure-threshold 10%
      certautopilot groups create fleet --target canary --target edge-eu --target edge-us \\
        --batch-size 1,100% --failure-threshold 0 --require-serving
    """
    from worker.app.service import create_group, get_group

    with runtime() as rt:
        group_id = create_group(
            rt,
            name,
            target,
            batch_size=batch_size,
            failure_threshold=failure_threshold,
            variables=variables(var),
            require_serving=require_serving,
        )
        view = get_group(rt, group_id)
    _print_group(view, output)


@app.command("add-targets")
@handled
def add_targets(
    group: Annotated[str, typer.Argument(help="Group name or id.")],
    target: Annotated[list[str], typer.Option("--target", help="Target to append (repeatable).")],
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Append targets to a group (they run after the current members)."""
    from worker.app.service import add_group_targets

    with runtime() as rt:
        view = add_group_targets(rt, group, target)
    _print_group(view, output)


@app.command("list")
@handled
def list_(output: OutputOption = OutputFormat.TABLE) -> None:
    """List groups."""
    from worker.app.service import list_groups

    list_rows(
        output,
        list_groups,
        ("name", "targets", "batch size", "failure threshold", "batches"),
        lambda row: (
            row.name,
            str(len(row.targets)),
            row.batch_size,
            row.failure_threshold,
            " | ".join(",".join(batch) for batch in row.batches),
        ),
    )


@app.command("show")
@handled
def show(
    name: Annotated[str, typer.Argument(help="Group name or id.")],
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Show a group: members and the batches a run would use."""
    from worker.app.service import get_group

    with runtime() as rt:
        view = get_group(rt, name)
    _print_group(view, output)
