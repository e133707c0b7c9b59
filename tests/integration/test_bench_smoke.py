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
    cells = run_benchmark(
        Options(sizes=(6,), workers=(1,), concurrency=2, kubectl_max=6, workdir=tmp_path),
        testenv,
    )

    assert [(cell.n, cell.w) for cell in cells] == [(6, 1)]
    cell = cells[0]
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
    formatted = row(cell)
    assert len(formatted) == len(COLUMNS)
    assert "-" not in formatted  # every column measured
    table = markdown(cells).splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(table) == 3
