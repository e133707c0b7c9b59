"""``certautopilot audit``: what is deployed where, today (read-only, one GET per target)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from worker.cli.common import NoWaitOption, OutputOption, TimeoutOption, say
from worker.cli.context import celery_dispatcher, runtime
from worker.cli.errors import EXIT_FAILED, fail, handled
from worker.cli.output import OutputFormat, emit, make_console, plain
from worker.core.audit import days_left

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from worker.app.service import AuditReport, AuditRow

__all__ = ["audit"]

_STATE_STYLES = {
    "current": "green",
    "outdated": "yellow",
    "drifted": "bold red",
    "unmanaged": "magenta",
    "missing": "bold yellow",
    "unreachable": "bold red",
    "forbidden": "bold red",
    "failed": "bold red",
}


def _days(row: AuditRow, warn_days: int) -> Text:
    if row.days_left is None:
        return plain("-")
    if row.days_left < 0:
        # Whole days since it expired (days_left rounds down: -0.2 days is -1).
        ago = days_left(row.checked_at, row.not_after) if row.checked_at and row.not_after else 0
        return plain(f"expired {ago}d ago", style="bold red")
    style = "bold yellow" if row.days_left < warn_days else ""
    return plain(str(row.days_left), style=style)


def _table(report: AuditReport) -> Table:
    table = Table(show_lines=False)
    for column in ("state", "days left", "not after", "target", "namespace/secret", "cn"):
        table.add_column(column)
    table.add_column("serial")
    table.add_column("details", overflow="fold")
    for row in report.rows:
        where = (
            f"{row.namespace}/{row.secret_name}"
            if row.namespace and row.secret_name
            else (row.namespace or "-")
        )
        serial = row.serial or "-"
        table.add_row(
            plain(row.state, style=_STATE_STYLES.get(row.state, "blue")),
            _days(row, report.warn_days),
            plain(f"{row.not_after:%Y-%m-%d}" if row.not_after else "-"),
            plain(row.target_name),
            plain(where),
            plain(row.common_name or "-"),
            plain(serial if len(serial) <= 16 else serial[:14] + "…"),
            plain(row.detail),
        )
    return table


def _summary(report: AuditReport) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report.counts().items())) or "none"
    expiring = sum(
        1 for r in report.rows if r.days_left is not None and 0 <= r.days_left < report.warn_days
    )
    return (
        f"audit of {len(report.runs)} distribution(s), {len(report.rows)} target(s): {counts} "
        f"({report.expired()} expired, {expiring} expiring within {report.warn_days} days)"
    )


def _wait(
    fetch_report: Callable[[], AuditReport], console: Console, timeout: float
) -> AuditReport | None:
    """Poll until every audit run finished; one progress line per change (None: timed out)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        report = fetch_report()
        done = sum(1 for row in report.rows if row.state not in ("pending", "running"))
        line = f"  Audit: {done}/{len(report.rows)} target(s) read"
        if line != last:
            console.print(plain(line))
            last = line
        if report.finished:
            return report
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


@handled
def audit(
    distribution: Annotated[
        str | None, typer.Option("--distribution", help="Audit this distribution (id).")
    ] = None,
    group: Annotated[
        str | None,
        typer.Option("--group", help="Audit every Kubernetes distribution attached to this group."),
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Audit every Kubernetes distribution's targets.")
    ] = False,
    warn_days: Annotated[
        int,
        typer.Option(
            "--warn-days",
            min=0,
            help="A deployed certificate expiring within this many days "
            "sorts as expiring (after expired ones, before everything else).",
        ),
    ] = 30,
    no_wait: NoWaitOption = False,
    timeout: TimeoutOption = 600.0,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """What is deployed where, today: read each target's Secret once and classify it.

    Read-only: one GET per target; no write, no snapshot, no server-side dry run. Each target
    is current (holds the certificate's current revision), outdated (an older revision we
    wrote), drifted (our label, but changed since our write), unmanaged (not written by
    CertAutoPilot), missing, unreachable or forbidden; with the deployed leaf's serial,
    not-after and days left, most urgent first (expired, expiring, drifted, ...). One audit run
    per distribution. Exit 1 when a target could not be read.

    \b
    Examples:
      certautopilot audit --all
      certautopilot audit --group edge -o json
      certautopilot audit --distribution DIST --warn-days 14
      certautopilot audit --all --no-wait -o name     # the run ids
    """
    import functools

    from worker.app.service import audit_report, enqueue_audit

    with runtime() as rt:
        run_ids = enqueue_audit(
            rt,
            celery_dispatcher(rt.settings),
            distribution=distribution,
            group=group,
            every=every,
        )
        if no_wait:
            if output.machine:
                emit(output, [{"run_id": run_id} for run_id in run_ids])
            else:
                say(
                    f"queued {len(run_ids)} audit run(s): {', '.join(run_ids)}; show one with "
                    "`certautopilot runs show RUN`"
                )
            return
        console = make_console(stderr=output.machine)
        if not output.machine:
            say(f"queued {len(run_ids)} audit run(s) (one per distribution)")
        report = _wait(
            functools.partial(audit_report, rt, run_ids, warn_days=warn_days), console, timeout
        )
    if report is None:
        fail(
            f"the audit did not finish within {timeout:.0f}s; it goes on in the workers — "
            f"follow its runs with `certautopilot runs show RUN` ({', '.join(run_ids)})",
            EXIT_FAILED,
        )
    if output.machine:
        emit(output, list(report.runs) if output is OutputFormat.NAME else report)
    else:
        out = make_console()
        out.print(_table(report))
        out.print(plain(_summary(report)))
        for run in report.runs:
            if run.state != "succeeded":
                out.print(
                    plain(f"run {run.id}: {run.state} — {run.reason or ''}", style="bold red")
                )
    if any(run.state != "succeeded" for run in report.runs):
        raise typer.Exit(EXIT_FAILED)
