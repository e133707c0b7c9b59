"""``python -m tests.chaos --minutes 30 [--seed N]``: seeded fault rounds until time is up.

Starts a test environment of its own (3 apiservers + etcd, a Redis with appendonly, a
PostgreSQL), then plays rounds with seeds N, N+1, … (see :mod:`tests.chaos.driver`), printing
one summary line per round. A round with a violation prints its seed, the violations and the
event log. Exit status 0 only when no round found a violation.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos.driver import RoundOptions, RoundResult, own_services, run_round
from tests.chaos.model import fault_schedule


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="time budget (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    parser.add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    parser.add_argument("--targets", type=int, default=12)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--fault-seconds", type=float, default=90.0)
    parser.add_argument("--settle-seconds", type=float, default=180.0)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="KIND",
        help="leave a fault kind out (repeatable), e.g. --skip renew while issue 17 §4 is open",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra setting for the workers (repeatable), to try a change on the same seeds",
    )
    args = parser.parse_args(argv)
    if any("=" not in item or item.startswith("=") for item in args.env):
        parser.error("--env takes KEY=VALUE, e.g. --env CAP_STALE_AFTER=10")
    if args.minutes <= 0 or args.targets < 3 or args.workers < 1 or args.clusters < 1:
        parser.error("--minutes must be > 0, --targets >= 3, --workers and --clusters >= 1")
    return args


def _row(index: int, result: RoundResult) -> str:
    runs = " ".join(f"{key}={value}" for key, value in result.runs.items())
    return (
        f"{index:>5} {result.seed:>10} {result.seconds:>7.0f} {sum(result.faults.values()):>6} "
        f"{len(result.violations):>10}  {runs}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run rounds until the budget is spent; print the table and every violation."""
    args = _parse(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    options = RoundOptions(
        targets=args.targets,
        workers=args.workers,
        concurrency=args.concurrency,
        fault_seconds=args.fault_seconds,
        settle_seconds=args.settle_seconds,
        skip=frozenset(args.skip),
        env=tuple(tuple(item.split("=", 1)) for item in args.env),  # type: ignore[misc]
    )
    try:
        fault_schedule(seed, duration=args.fault_seconds, skip=options.skip)
    except ValueError as exc:
        print(f"python -m tests.chaos: {exc}", file=sys.stderr)
        return 2
    # SIGTERM (timeout, CI cancel) unwinds like Ctrl-C: every round's finally stops its
    # workers by PID and the environment stops its servers; the default would orphan them.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _rounds(args, seed, options)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rounds(args: argparse.Namespace, seed: int, options: RoundOptions) -> int:
    deadline = time.monotonic() + args.minutes * 60
    results: list[RoundResult] = []
    header = f"{'round':>5} {'seed':>10} {'seconds':>7} {'faults':>6} {'violations':>10}  runs"
    with tempfile.TemporaryDirectory(prefix="cap-chaos-") as folder:
        with own_services(Path(folder), cluster_count=args.clusters) as services:
            print(f"first seed {seed}; {args.minutes:g} minutes", flush=True)
            print(header, flush=True)
            while time.monotonic() < deadline and (
                args.rounds is None or len(results) < args.rounds
            ):
                result = run_round(services, seed + len(results), options)
                results.append(result)
                print(_row(len(results), result), flush=True)
                if result.violations:
                    _keep_logs(result)
                    print(result.report(), flush=True)
        faults: dict[str, int] = {}
        for result in results:
            for kind, count in result.faults.items():
                faults[kind] = faults.get(kind, 0) + count
        bad = [result.seed for result in results if result.violations]
        print(header)
        for index, result in enumerate(results, 1):
            print(_row(index, result))
        print(f"rounds: {len(results)}, minutes: {sum(r.seconds for r in results) / 60:.1f}")
        print(f"faults: {faults}")
        print(f"seeds with violations: {bad or 'none'}")
    return 1 if bad else 0


def _keep_logs(result: RoundResult) -> None:
    """Copy the failing round's worker logs out of the temporary folder."""
    import shutil

    if result.logs is None:
        return
    kept = Path(tempfile.gettempdir()) / f"cap-chaos-seed-{result.seed}"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(result.logs, kept, ignore=shutil.ignore_patterns("data"))
    result.logs = kept
    print(f"worker logs kept in {kept}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
