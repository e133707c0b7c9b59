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
    report = follow_run(
        functools.partial(run_report, rt, run_id),
        console=make_console(stderr=True) if quiet else console,
        timeout=timeout,
        total_hint=total_hint,
    )
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
                functools.partial(run_report, rt, child_id),
                console=make_console(stderr=True) if quiet else console,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            if child is None:
                fail(f"stacked run {child_id} did not finish in time", EXIT_FAILED)
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
            row.action,
            row.state,
            ", ".join(f"{n} {status_words(status)}" for status, n in sorted(row.counts().items()))
            or "-",
            format_time(row.created_at),
            reason_words(row.reason or ""),
        ),
    )


@app.command("show")
@handled
def show(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    diff: Annotated[bool, typer.Option("--diff", help="Print the full diff per target.")] = False,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Show a run: state, timing and the per-target table with a diff summary.

    \b
    Examples:
      certautopilot runs show RUN_ID --diff
      certautopilot runs show RUN_ID -o json
    """
    from worker.app.pools import silent_pools_of_run
    from worker.app.service import run_report

    with runtime() as rt:
        report = run_report(rt, run_id)
        # A running run whose open targets wait in a pool with no live worker says so.
        waiting = silent_pools_of_run(rt, report.id)
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
