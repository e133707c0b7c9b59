"""Counters read from the real components, before and after each measured phase.

Every number here comes from the component that did the work, not from the code under
test counting itself:

* API requests: each apiserver's own ``apiserver_request_total`` (scraped from
  ``/metrics`` as cluster admin), for ``resource="secrets"`` only: the benchmark touches
  nothing else, and the apiserver's own background loops (leases, endpoints) never do.
* Database: the statements ``pg_stat_statements`` counted in the benchmark database
  (SELECT/INSERT/UPDATE/DELETE, each row of an executemany; SQLAlchemy's pre-ping is an
  empty query, which it does not count), minus the ones the benchmark itself caused; also
  ``pg_stat_database.xact_commit + xact_rollback`` (in the JSON only: a lower bound).
* Broker: Redis ``INFO commandstats`` call counts (LPUSH = messages published to a queue).
* Processes: RSS and thread count from ``/proc`` (no psutil needed).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

#: PostgreSQL backends flush their statistics at most once a second when they go idle.
PG_STATS_FLUSH_SECONDS = 1.5


def parse_request_totals(text: str, resource: str = "secrets") -> Counter[str]:
    """Sum ``apiserver_request_total`` samples for ``resource`` by verb (POST, PUT, GET ...)."""
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match.group("labels")))
        if labels.get("resource") != resource or labels.get("subresource"):
            continue
        # dry-run requests are labelled dry_run="All"; count them under their own verb name.
        verb = labels.get("verb", "?")
        if labels.get("dry_run"):
            verb += "(dry-run)"
        totals[verb] += int(float(match.group("value")))
    return totals


def scrape_secret_requests(admin_clients: Sequence[Any]) -> Counter[str]:
    """Secret requests by verb, summed over every apiserver (admin ApiClients)."""
    totals: Counter[str] = Counter()
    for api in admin_clients:
        request = api.param_serialize(method="GET", resource_path="/metrics", auth_settings=[])
        response = api.call_api(*request, _request_timeout=(5, 30))
        try:
            text = (response.read() or b"").decode("utf-8")
        finally:
            response.response.release_conn()
        totals.update(parse_request_totals(text))
    return totals


WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "CREATE", "UPDATE", "APPLY"})


def writes(requests: Mapping[str, int]) -> int:
    """How many of ``requests`` (by verb) persisted something (dry runs excluded)."""
    return sum(count for verb, count in requests.items() if verb.upper() in WRITE_VERBS)


def pg_transactions(conninfo: str) -> int:
    """Committed plus rolled-back transactions of the database ``conninfo`` names."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


#: Transactions one snapshot's probes add to the count read next time (measured: two
#: snapshots of an idle database differ by six). A backend that goes idle publishes its
#: last second of counters only up to ten seconds later, so this count is a lower bound;
#: the table shows statements (pg_stat_statements, counted synchronously) instead.
PG_PROBE_TRANSACTIONS = 6


def pg_statements(conninfo: str) -> int | None:
    """Statements executed in the database ``conninfo`` names (pg_stat_statements), or None
    when the server was started without the module."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as connection:
        try:
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            row = connection.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()
        except psycopg.errors.ObjectNotInPrerequisiteState:  # not in shared_preload_libraries
            return None
    return int(row[0]) if row else 0


#: Statements one snapshot's probes (pg_transactions, pg_statements) add to the next count
#: (measured: two snapshots of an idle database differ by exactly this).
PG_PROBE_STATEMENTS = 3


def redis_command_calls(url: str) -> Counter[str]:
    """Calls per Redis command since the server started (``INFO commandstats``)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats: Mapping[str, Any] = client.info("commandstats")
    finally:
        client.close()
    calls: Counter[str] = Counter()
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if name in ("info", "client|setinfo", "hello"):
            continue  # the benchmark's own probes
        calls[name] = int(value["calls"])
    return calls


def counter_delta(after: Mapping[str, int], before: Mapping[str, int]) -> Counter[str]:
    """``after - before`` per key, keeping only keys that moved."""
    delta: Counter[str] = Counter()
    for key, value in after.items():
        moved = value - before.get(key, 0)
        if moved:
            delta[key] = moved
    return delta


@dataclass(frozen=True)
class ProcessStats:
    """Memory and threads of one process."""

    pid: int
    rss_mb: float
    threads: int


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after the last ")" don't.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def process_stats(pids: Iterable[int]) -> list[ProcessStats]:
    """RSS (MB) and thread count of each live process in ``pids``."""
    stats = []
    for pid in pids:
        try:
            fields = _status(pid)
        except OSError:
            continue  # exited meanwhile
        rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
        stats.append(ProcessStats(pid, rss_kb / 1024, int(fields.get("Threads", "0"))))
    return stats


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time the live processes ``pids`` have used so far."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICKS


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def wait_for_pg_stats() -> None:
    """Give idle PostgreSQL backends time to publish their transaction counters."""
    time.sleep(PG_STATS_FLUSH_SECONDS)
