"""The benchmark still runs end to end (tiny size): real apiservers, Redis, PostgreSQL, workers.

Timings are never asserted here; only that every column is measured and the counters add up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.metrics import parse_request_totals, writes
from bench.run import Options, run_benchmark
from bench.table import COLUMNS, markdown, row
from tests.testenv import TestEnvironment

METRICS = """\
# HELP apiserver_request_total [STABLE] Counter of apiserver requests
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",verb="GET",version="v1"} 7
apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",verb="GET",version="v1"} 3
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",verb="POST",version="v1"} 3
apiserver_request_total{code="201",component="apiserver",dry_run="All",group="",resource="secrets",scope="resource",subresource="",verb="POST",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 40
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="serviceaccounts",scope="resource",subresource="token",verb="POST",version="v1"} 1
"""  # noqa: E501


def test_request_totals_count_secrets_by_verb_and_keep_dry_runs_apart() -> None:
    totals = parse_request_totals(METRICS)

    assert totals == {"GET": 10, "POST": 3, "POST(dry-run)": 2}
    assert writes(totals) == 3


@pytest.mark.integration
def test_tiny_benchmark_fills_every_column_and_the_rerun_writes_nothing(
    testenv: TestEnvironment, tmp_path: Path
) -> None:
    results = run_benchmark(
        Options(
            sizes=(6,),
            workers=(1,),
            concurrency=2,
            kubectl_max=6,
            workdir=tmp_path,
            namespaces=4,
            embedded=(6,),
            first_write=2,
        ),
        testenv,
    )
    cells = results.cells

    assert [(cell.path, cell.n, cell.w) for cell in cells] == [
        ("redis+pg", 6, 1),
        ("embedded", 6, 1),
    ]
    cell, embedded = cells
    assert cell.counts == {"created": 6}
    assert cell.api_requests == {"GET": 6, "POST": 6}
    assert cell.bare_api_requests == {"GET": 6, "POST": 6}
    assert cell.kubectl_s is not None and writes(cell.kubectl_api_requests) == 6
    assert cell.rerun_counts == {"unchanged": 6}
    assert cell.rerun_api_requests == {"GET": 6}
    # The transaction count is a lower bound that lags (bench/metrics.py: idle backends publish
    # their counters up to ten seconds late) and reads negative on a loaded machine; the
    # statement count below is synchronous and is the one the table shows.
    assert cell.broker_calls.get("lpush", 0) >= 6
    assert cell.db_statements is not None and cell.db_statements > 0  # pg_stat_statements
    assert cell.rss_mb_max > 0 and cell.threads >= len(cell.rss_mb_pool) == 3
    formatted = row(cell, cells)
    assert len(formatted) == len(COLUMNS)
    # Every column measured, except the embedded path's ratio to this very path.
    assert [c for c, value in zip(COLUMNS, formatted, strict=True) if value == "-"] == [
        "embedded/redis+pg"
    ]
    # Several targets share a namespace (6 targets, 4 namespaces): each has its own Secret.
    assert embedded.counts == {"created": 6} and embedded.rerun_counts == {"unchanged": 6}
    assert embedded.api_requests == {"GET": 6, "POST": 6}
    assert embedded.db_statements is None and not embedded.broker_calls  # no servers
    embedded_row = dict(zip(COLUMNS, row(embedded, cells), strict=True))
    assert embedded_row["embedded/redis+pg"] != "-"
    assert [(item.path, len(item.ms)) for item in results.first_writes] == [
        ("redis+pg", 2),
        ("embedded", 2),
    ]
    assert all(ms > 0 for item in results.first_writes for ms in item.ms)
    table = markdown(cells, results.first_writes).splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(table) == 4 + 1 + 2 + len(results.first_writes)
