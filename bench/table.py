"""The one results table: rows per (N, W), printed with rich or written as Markdown."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from bench.metrics import writes
from bench.run import Cell, FirstWrite

COLUMNS = (
    "path",
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
    "embedded/redis+pg",
    "API req/target",
    "DB stmts/target",
    "LPUSH/target",
    "Redis cmds/target",
    "CPU ms/target workers+PG+Redis",
    "CPU ms/target bare",
    "own CPU/bare CPU",
    "CPU ms/target kube pipe|bare",
    "max RSS MB",
    "RSS MB per run",
    "threads/procs",
    "re-run s",
    "re-run writes",
)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _own_cpu(cell: Cell) -> float:
    """CPU seconds the pipeline itself cost: workers, PostgreSQL and Redis (median of runs)."""
    if cell.own_cpu_runs:
        return statistics.median(cell.own_cpu_runs)
    return sum(cell.cpu_s.get(name, 0.0) for name in ("workers", "postgres", "redis"))


def _bare_cpu(cell: Cell) -> float:
    return statistics.median(cell.bare_cpu_runs) if cell.bare_cpu_runs else cell.bare_cpu_s


def _peer(cell: Cell, cells: Sequence[Cell]) -> Cell | None:
    """The Redis/PostgreSQL cell an embedded cell is compared with (same N and W)."""
    if cell.path != "embedded":
        return None
    for other in cells:
        if other.path != "embedded" and (other.n, other.w) == (cell.n, cell.w):
            return other
    return None


def row(cell: Cell, cells: Sequence[Cell] = ()) -> list[str]:
    """The table row of one cell, formatted (``cells``: the whole run, for the embedded
    path's ratio to the Redis/PostgreSQL cell of the same N and W)."""
    api = sum(cell.api_requests.values())
    rerun_api = cell.rerun_api_requests
    peer = _peer(cell, cells)
    return [
        cell.path,
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
        _num(cell.pipeline_s / peer.pipeline_s if peer and peer.pipeline_s else None),
        _num(cell.per_target(api)),
        _num(None if cell.db_statements is None else cell.per_target(cell.db_statements), 2),
        _num(cell.per_target(cell.broker_calls.get("lpush", 0))),
        _num(cell.per_target(sum(cell.broker_calls.values())), 1),
        _num(cell.per_target(1000 * _own_cpu(cell))),
        _num(cell.per_target(1000 * _bare_cpu(cell))),
        _num(_own_cpu(cell) / _bare_cpu(cell) if _bare_cpu(cell) else None),
        f"{_num(cell.per_target(1000 * cell.cpu_s.get('kube', 0.0)), 1)}"
        f"|{_num(cell.per_target(1000 * cell.bare_phase_cpu_s.get('kube', 0.0)), 1)}",
        _num(cell.rss_mb_max, 0),
        "/".join(f"{value:.0f}" for value in cell.rss_mb_runs) or "-",
        f"{cell.threads}/{len(cell.rss_mb_pool)}",
        _num(cell.rerun_s),
        f"{writes(rerun_api)} ({sum(rerun_api.values())} req)",
    ]


FIRST_WRITE_COLUMNS = ("path", "W", "runs", "first write p50 ms", "first write p95 ms")


def first_write_row(item: FirstWrite) -> list[str]:
    """The latency table's row of one path."""
    return [item.path, str(item.w), str(len(item.ms)), _num(item.p50_ms, 0), _num(item.p95_ms, 0)]


def render_rich(cells: Sequence[Cell], title: str, first_writes: Sequence[FirstWrite] = ()) -> None:
    """Print the table on stdout with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="right", overflow="fold")
    for cell in cells:
        table.add_row(*row(cell, cells))
    console = Console(width=250)
    console.print(table)
    if first_writes:
        latency = Table(title="Enqueue -> first Secret written (canary), ms")
        for column in FIRST_WRITE_COLUMNS:
            latency.add_column(column, justify="right")
        for item in first_writes:
            latency.add_row(*first_write_row(item))
        console.print(latency)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(values) + " |" for values in rows]


def markdown(cells: Sequence[Cell], first_writes: Sequence[FirstWrite] = ()) -> str:
    """The tables as GitHub Markdown."""
    lines = _markdown_table(COLUMNS, [row(cell, cells) for cell in cells])
    if first_writes:
        lines += [
            "",
            *_markdown_table(FIRST_WRITE_COLUMNS, [first_write_row(i) for i in first_writes]),
        ]
    return "\n".join(lines) + "\n"
