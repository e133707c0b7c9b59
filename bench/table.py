"""The one results table: rows per (N, W), printed with rich or written as Markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence

from bench.metrics import writes
from bench.run import Cell

COLUMNS = (
    "N",
    "W",
    "pipeline s",
    "targets/s",
    "p50 ms",
    "p95 ms",
    "bare s",
    "kubectl s",
    "pipe/bare",
    "pipe/kubectl",
    "API req/target",
    "DB stmts/target",
    "LPUSH/target",
    "Redis cmds/target",
    "CPU ms/target workers+PG+Redis",
    "CPU ms/target bare",
    "CPU ms/target kube pipe|bare",
    "max RSS MB",
    "threads/procs",
    "re-run s",
    "re-run writes",
)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _own_cpu(cell: Cell) -> float:
    """CPU seconds the pipeline itself cost: workers, PostgreSQL and Redis."""
    return sum(cell.cpu_s.get(name, 0.0) for name in ("workers", "postgres", "redis"))


def row(cell: Cell) -> list[str]:
    """The table row of one cell, formatted."""
    api = sum(cell.api_requests.values())
    rerun_api = cell.rerun_api_requests
    return [
        str(cell.n),
        str(cell.w),
        _num(cell.pipeline_s),
        _num(cell.targets_per_s, 1),
        _num(cell.p50_ms, 0),
        _num(cell.p95_ms, 0),
        _num(cell.bare_s),
        _num(cell.kubectl_s, 1),
        _num(cell.pipeline_s / cell.bare_s if cell.bare_s else None),
        _num(cell.pipeline_s / cell.kubectl_s if cell.kubectl_s else None, 3),
        _num(cell.per_target(api)),
        _num(None if cell.db_statements is None else cell.per_target(cell.db_statements), 2),
        _num(cell.per_target(cell.broker_calls.get("lpush", 0))),
        _num(cell.per_target(sum(cell.broker_calls.values())), 1),
        _num(cell.per_target(1000 * _own_cpu(cell))),
        _num(cell.per_target(1000 * cell.bare_cpu_s)),
        f"{_num(cell.per_target(1000 * cell.cpu_s.get('kube', 0.0)), 1)}"
        f"|{_num(cell.per_target(1000 * cell.bare_phase_cpu_s.get('kube', 0.0)), 1)}",
        _num(cell.rss_mb_max, 0),
        f"{cell.threads}/{len(cell.rss_mb_pool)}",
        _num(cell.rerun_s),
        f"{writes(rerun_api)} ({sum(rerun_api.values())} req)",
    ]


def render_rich(cells: Sequence[Cell], title: str) -> None:
    """Print the table on stdout with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="right", overflow="fold")
    for cell in cells:
        table.add_row(*row(cell))
    Console(width=250).print(table)


def markdown(cells: Sequence[Cell]) -> str:
    """The table as GitHub Markdown."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row(cell)) + " |" for cell in cells]
    return "\n".join(lines) + "\n"
