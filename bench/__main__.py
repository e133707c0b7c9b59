"""python -m bench [--quick] [--sizes 50,200,1000] [--workers 1,2,4] ...

Starts its own apiservers, Redis and PostgreSQL (tests.testenv), runs the fan-out benchmark
and prints one table. Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.run import Options, run_benchmark, save, say
from bench.table import markdown, render_rich

QUICK = {"sizes": (50, 200), "workers": (1, 2)}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def machine() -> str:
    """A one-line description of this machine (cores, memory, Python)."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {memory_gib:.0f} GiB, Python {platform.python_version()}, "
        f"load average before the run {load}"
    )


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so workers and servers are stopped on the way out.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print the table."""
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes", type=_ints, default=None, help="target counts N (default 50,200,1000)"
    )
    parser.add_argument(
        "--workers", type=_ints, default=None, help="worker process counts W (default 1,2,4)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="pool processes per worker (default 4); bare threads = W x this",
    )
    parser.add_argument("--clusters", type=int, default=4, help="apiservers (default 4)")
    parser.add_argument(
        "--kubectl-max",
        type=int,
        default=200,
        help="run the kubectl loop only for N up to this (default 200: it takes ~0.6 s per "
        "target, so N=1000 alone would take ~10 minutes; 0: never)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short profile: N in {QUICK['sizes']}, W in {QUICK['workers']}",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of the pipeline and of the bare client per cell (the table shows medians)",
    )
    parser.add_argument(
        "--profile", type=Path, help="record py-spy profiles of the workers into this folder"
    )
    parser.add_argument(
        "--namespaces",
        type=int,
        default=1000,
        help="namespaces at most (default 1000); beyond, targets share them round-robin",
    )
    parser.add_argument(
        "--embedded",
        type=_ints,
        default=(),
        help="also run these N on the embedded default (SQLite + SQLAlchemy broker), W=1; "
        "compared with the Redis/PostgreSQL cell of the same N and W (e.g. 200,1000)",
    )
    parser.add_argument(
        "--first-write",
        type=int,
        default=0,
        metavar="RUNS",
        help="enqueue -> first Secret written of a canary run, RUNS times per path (e.g. 20)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--profile-idle",
        action="store_true",
        help="with --profile: sample waiting threads too (where the wall time goes)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the workers' logs, databases and kubeconfigs here (default: a temporary "
        "folder removed afterwards)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the table here as Markdown")
    args = parser.parse_args(argv)
    defaults = Options()
    options = Options(
        sizes=args.sizes or (QUICK["sizes"] if args.quick else defaults.sizes),
        workers=args.workers or (QUICK["workers"] if args.quick else defaults.workers),
        concurrency=args.concurrency,
        clusters=args.clusters,
        kubectl_max=args.kubectl_max,
        repeat=max(1, args.repeat),
        profile_dir=args.profile,
        profile_idle=args.profile_idle,
        namespaces=args.namespaces,
        embedded=args.embedded,
        first_write=max(0, args.first_write),
        workdir=args.workdir.absolute() if args.workdir else None,
    )
    from tests.testenv import TestEnvironment

    described = machine()
    started = datetime.now(UTC)
    environment = TestEnvironment(cluster_count=options.clusters, environ=os.environ)
    try:
        results = run_benchmark(options, environment)
    finally:
        say("stopping the environment")
        environment.close()
    title = (
        f"Fan-out to N targets over {options.clusters} apiservers, "
        f"{started:%Y-%m-%d %H:%M}Z, {described}"
    )
    render_rich(results.cells, title, results.first_writes)
    if args.json:
        save(results, args.json)
    if args.markdown:
        args.markdown.write_text(f"{title}\n\n{markdown(results.cells, results.first_writes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
