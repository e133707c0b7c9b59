"""``certautopilot run``, ``rollback`` and ``runs``: start runs, follow them, show results."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from worker.cli.common import (
    NoWaitOption,
    OutputOption,
    TimeoutOption,
    list_rows,
    new_typer,
    say,
)
from worker.cli.context import celery_dispatcher, runtime
from worker.cli.errors import EXIT_FAILED, CliError, fail, handled
from worker.cli.output import (
    OutputFormat,
    emit,
    follow_run,
    format_time,
    make_console,
    plain,
    print_report,
    reason_words,
    run_headline,
    status_words,
    to_jsonable,
)

if TYPE_CHECKING:
    from worker.app.service import RunReport
    from worker.platform.runtime import Runtime

app = new_typer("Runs of distributions and their per-target results.")


def _follow_and_report(
    rt: Runtime,
    run_id: str,
    *,
    timeout: float,
    output: OutputFormat,
    total_hint: int,
) -> int:
    """Follow a run (and the stacked runs it starts) to the end; print it; return the exit code."""
    from models.enums import RunState
    from worker.app.service import run_report, stacked_runs

    console = make_console()
    quiet = output.machine
    deadline = time.monotonic() + timeout
    # Followed by its counts (one grouped query a poll, whatever the run's size); the rows are
    # read once, at the end.
    report = follow_run(
        functools.partial(run_report, rt, run_id, limit=0),
        console=make_console(stderr=True) if quiet else console,
        timeout=timeout,
        total_hint=total_hint,
    )
    if report is not None:
        report = run_report(rt, run_id)
    if report is None:
        fail(
            f"run {run_id} did not finish within {timeout:.0f}s; it goes on in the workers — "
            f"follow it with `certautopilot runs show {run_id}`",
            EXIT_FAILED,
        )
    reports = [report]
    if report.state == RunState.SUCCEEDED:
        seen: set[str] = set()
        # Stacked distributions (e.g. a webhook after the Kubernetes one) start in turn.
        while True:
            chain = [child for child in stacked_runs(rt, run_id) if child not in seen]
            if not chain:
                break
            child_id = chain[0]
            seen.add(child_id)
            child = follow_run(
                functools.partial(run_report, rt, child_id, limit=0),
                console=make_console(stderr=True) if quiet else console,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            if child is None:
                fail(f"stacked run {child_id} did not finish in time", EXIT_FAILED)
            child = run_report(rt, child_id)
            reports.append(child)
            if child.state != RunState.SUCCEEDED:
                break
    if quiet:
        emit(output, {"run": reports[0], "stacked": reports[1:]})
    else:
        print_report(
            console,
            reports[0],
            diffs=reports[0].action == "dry_run",
            adopting=_adopting(rt, reports[0]),
        )
        for child in reports[1:]:
            console.print(run_headline(child))
    failed = any(item.state != RunState.SUCCEEDED for item in reports)
    return EXIT_FAILED if failed else 0


def _adopting(rt: Runtime, report: RunReport) -> set[str]:
    """Ids of the run's targets that adopt unmanaged Secrets (for the diff's wording)."""
    from worker.app.service import list_targets

    in_run = {result.target_id for result in report.results}
    return {t.id for t in list_targets(rt) if t.id in in_run and t.adopt_unmanaged}


def _start_run(
    distribution_id: str,
    action: str,
    *,
    force: bool,
    wait: bool,
    timeout: float,
    output: OutputFormat,
) -> None:
    from worker.app.service import enqueue_run, get_distribution

    with runtime() as rt:
        distribution = get_distribution(rt, distribution_id)
        run_id = enqueue_run(
            rt, celery_dispatcher(rt.settings), distribution_id, action, force=force
        )
        if not wait:
            if output.machine:
                emit(output, {"run_id": run_id})
            else:
                say(f"queued run {run_id}; follow it with `certautopilot runs show {run_id}`")
            return
        if not output.machine:
            say(
                f"queued {action.replace('_', '-')} run {run_id} of distribution "
                f"{distribution.id} ({distribution.destination}, {distribution.target_count} "
                "target(s))"
            )
        code = _follow_and_report(
            rt, run_id, timeout=timeout, output=output, total_hint=distribution.target_count
        )
    if code:
        raise typer.Exit(code)


@handled
def run(
    distribution_id: Annotated[str, typer.Argument(help="Distribution id.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the diff per target; write nothing.")
    ] = False,
    execute: Annotated[bool, typer.Option("--execute", help="Write the Secrets.")] = False,
    no_wait: NoWaitOption = False,
    timeout: TimeoutOption = 600.0,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Dry-run or execute a distribution and follow it (exit 1 if it fails or halts).

    \b
    Examples:
      certautopilot run DIST --dry-run      # the diff per target; writes nothing
      certautopilot run DIST --execute
      certautopilot run DIST --execute --no-wait -o name    # prints the run id
    """
    if dry_run == execute:
        raise CliError("choose exactly one of --dry-run (show the diff) or --execute (write)")
    _start_run(
        distribution_id,
        "dry_run" if dry_run else "execute",
        force=False,
        wait=not no_wait,
        timeout=timeout,
        output=output,
    )


@handled
def rollback(
    distribution_id: Annotated[str, typer.Argument(help="Distribution id.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Restore even where the Secret changed since our write."),
    ] = False,
    no_wait: NoWaitOption = False,
    timeout: TimeoutOption = 600.0,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Restore the Secrets as they were before the distribution's first write.

    \b
    Examples:
      certautopilot rollback DIST
      certautopilot rollback DIST --force   # even where the Secret drifted
    """
    _start_run(
        distribution_id, "rollback", force=force, wait=not no_wait, timeout=timeout, output=output
    )


@app.command("list")
@handled
def list_(
    distribution: Annotated[
        str | None, typer.Option("--distribution", help="Only this distribution's runs.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="How many runs.", min=1)] = 20,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """List recent runs, newest first.

    \b
    Examples:
      certautopilot runs list --limit 5
      certautopilot runs list -o name | head -1
    """
    from worker.app.service import list_runs

    list_rows(
        output,
        lambda rt: list_runs(rt, distribution_id=distribution, limit=limit),
        ("id", "action", "state", "targets", "created", "reason"),
        lambda row: (
            row.id,
            row.action.replace("_", "-"),  # as the CLI spells it: --dry-run
            row.state,
            ", ".join(f"{n} {status_words(status)}" for status, n in sorted(row.counts().items()))
            or "-",
            format_time(row.created_at),
            reason_words(row.reason or ""),
        ),
    )


#: Per-target rows ``runs show`` prints unless told otherwise: a page of a large run (rich
#: lays a table out at ~2.7 ms a row, so 1000 rows took 3 s; bench/scale.py).
SHOW_LIMIT = 100


@app.command("show")
@handled
def show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    diff: Annotated[bool, typer.Option("--diff", help="Print the full diff per target.")] = False,
    limit: Annotated[
        int, typer.Option("--limit", help="Per-target rows to show (a page).", min=0)
    ] = SHOW_LIMIT,
    offset: Annotated[
        int, typer.Option("--offset", help="Skip this many per-target rows first.", min=0)
    ] = 0,
    all_rows: Annotated[
        bool,
        typer.Option(
            "--all", help="Every per-target row (with -o json: written as they are read)."
        ),
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Show a run: state, timing, counts and the per-target table with a diff summary.

    \b
    Examples:
      certautopilot runs show RUN_ID --diff
      certautopilot runs show RUN_ID -o json
      certautopilot runs show RUN_ID --offset 1000 --limit 1000   # the next page
      certautopilot runs show RUN_ID --all -o json > results.json   # every target, streamed
    """
    from worker.app.pools import silent_pools_of_run
    from worker.app.service import run_report

    with runtime() as rt:
        streamed = all_rows and output is OutputFormat.JSON
        page = None if all_rows else limit
        report = run_report(
            rt, run_id, offset=0 if all_rows else offset, limit=0 if streamed else page
        )
        # A running run whose open targets wait in a pool with no live worker says so.
        waiting = silent_pools_of_run(rt, report.id)
        if streamed:
            _stream_json(rt, report, waiting)
            return
        adopting = _adopting(rt, report) if diff else None
    if output.machine:
        emit(output, {**to_jsonable(report), "waiting_pools": waiting})
        return
    say(
        f"run {report.id} ({report.action}) of distribution {report.distribution_id}\n"
        f"  state:    {report.state}\n"
        f"  created:  {format_time(report.created_at)}  started: {format_time(report.started_at)}"
        f"  finished: {format_time(report.finished_at)}\n"
        f"  batches:  {report.batches} (current {min(report.current_batch + 1, report.batches)})"
        + (
            f"\n  {'compares:' if report.action == 'audit' else 'deploys: '} "
            f"{report.certificate.describe()}"
            if report.certificate
            else ""
        )
    )
    for pool in waiting:
        say(Text.assemble("  waiting:  ", plain(pool.describe(), style="bold yellow")))
    print_report(make_console(), report, diffs=diff, adopting=adopting)
    shown = len(report.results)
    if shown < report.target_count:
        say(
            f"  rows {report.results_offset + 1 if shown else report.results_offset}-"
            f"{report.results_offset + shown} of {report.target_count} target(s); "
            f"next page: --offset {report.results_offset + shown}, every row: --all"
        )


def _stream_json(rt: Runtime, report: RunReport, waiting: object) -> None:
    """``runs show --all -o json``: the document ``-o json`` prints, with the per-target
    results written as they are read from the database instead of held in memory at once."""
    import json
    import sys

    from worker.app.service import stream_run_results

    head = json.dumps({**to_jsonable(report), "waiting_pools": to_jsonable(waiting)}, indent=2)
    # The placeholder is the "results" key with its empty list, at the document's first level.
    before, marker, after = head.partition('\n  "results": []')
    if not marker:
        raise RuntimeError("the run's JSON document has no results list to fill")
    out = sys.stdout
    out.write(before + '\n  "results": [')
    for index, result in enumerate(stream_run_results(rt, report.id)):
        # Indented as the list item it is in the document (no empty line inside an item).
        item = "    " + json.dumps(to_jsonable(result), indent=2).replace("\n", "\n    ")
        out.write(("," if index else "") + "\n" + item)
    out.write(("\n  ]" if report.target_count else "]") + after + "\n")
    out.flush()


@app.command("cancel")
@handled
def cancel(
    run_id: Annotated[str, typer.Argument(help="Id of a queued or running run.")],
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Halt a run now: its pending targets are skipped and the distribution is free again.

    Targets a worker is processing at this moment finish and are recorded; nothing written is
    undone (roll back for that). For a run that cannot progress — a target of a pool with no
    worker, such as a misspelled --pool — or a rollout that must stop.

    \b
    Examples:
      certautopilot runs cancel RUN_ID
      certautopilot runs show RUN_ID     # halted: cancelled by the operator
    """
    from worker.app.service import cancel_run

    with runtime() as rt:
        cancelled, skipped = cancel_run(rt, run_id)
    if output.machine:
        emit(output, {"run_id": cancelled, "state": "halted", "skipped": skipped})
        return
    say(f"run {cancelled} halted: cancelled by the operator, {skipped} pending target(s) skipped")
