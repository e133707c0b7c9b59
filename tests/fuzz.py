"""Fuzzing the untrusted-input parsers: the settings the fuzz tests use, and a campaign runner.

The fuzz tests (``tests/unit/test_fuzz_*.py``) are hypothesis property tests with targeted
strategies. They read their settings from a hypothesis profile chosen by the
``CAP_FUZZ_PROFILE`` environment variable:

* ``fuzz-ci`` (the default): a bounded number of examples, so the whole fuzz set stays under
  a minute in the unit suite;
* ``fuzz-campaign``: many examples per test and round.

A campaign runs rounds of the fuzz tests with fresh seeds until its time is up::

    python -m tests.fuzz --minutes 10            # all fuzz tests
    python -m tests.fuzz --minutes 3 -k kubeconfig

Failing examples are kept in hypothesis' example database (``.hypothesis/``) and replayed
first by every later run, including the unit suite's. The runner prints rounds, examples and
failures; it exits 1 when any round failed.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

PROFILE_VARIABLE = "CAP_FUZZ_PROFILE"

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def _register(name: str, max_examples: int) -> None:
    settings.register_profile(
        name,
        max_examples=max_examples,
        # Bounded time per input: a generous deadline, because the CI machine is shared.
        deadline=timedelta(seconds=2),
        suppress_health_check=_SLOW_IS_FINE,
        print_blob=True,
    )


_register("fuzz-ci", 120)
_register("fuzz-campaign", 1500)


SECONDS_PER_INPUT = 2.0
MEMORY_PER_INPUT = 32 * 1024 * 1024


@contextmanager
def within_budget() -> Iterator[None]:
    """Fail unless the block runs within the per-input time and (Python heap) memory budget.

    Memory is what ``tracemalloc`` sees: Python objects, which is where a parser's cost
    grows (OpenSSL's own allocations in the bundle tests are not traced).
    """
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] - baseline
        if started_tracing:
            tracemalloc.stop()
        assert elapsed < SECONDS_PER_INPUT, f"one input took {elapsed:.2f}s"
        assert peak < MEMORY_PER_INPUT, f"one input used {peak / 2**20:.1f} MiB"


def fuzz_settings(**overrides: Any) -> settings:
    """The settings of the selected fuzz profile, with per-test ``overrides``.

    ``max_examples`` in ``overrides`` is scaled by the profile (a campaign multiplies it).
    """
    name = os.environ.get(PROFILE_VARIABLE, "fuzz-ci")
    profile = settings.get_profile(name)
    if "max_examples" in overrides:
        factor = profile.max_examples / settings.get_profile("fuzz-ci").max_examples
        overrides["max_examples"] = max(1, int(int(overrides["max_examples"]) * factor))  # type: ignore[call-overload]
    return settings(profile, **overrides)


# hypothesis --hypothesis-show-statistics: "- 150 passing, 0 failing, and 52 invalid test cases"
ROUND_TIMEOUT_SECONDS = 3600.0
_STATS = re.compile(r"(\d+) passing(?: examples)?, (\d+) failing")
_ROOT = Path(__file__).resolve().parent.parent


def _round(selection: str | None, seed: int, timeout: float) -> tuple[int, int, bool, str]:
    """One round: every selected fuzz test once; (passing, failing, ok, output)."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        *sorted(str(p.relative_to(_ROOT)) for p in (_ROOT / "tests/unit").glob("test_fuzz_*.py")),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--hypothesis-seed={seed}",
        "--hypothesis-show-statistics",
    ]
    if selection:
        command += ["-k", selection]
    env = {**os.environ, PROFILE_VARIABLE: "fuzz-campaign"}
    try:
        done = subprocess.run(
            command,
            cwd=_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return 0, 0, False, out + f"\n(round hung: no result after {timeout:.0f}s)"
    passing = failing = 0
    for match in _STATS.finditer(done.stdout):
        passing += int(match.group(1))
        failing += int(match.group(2))
    return passing, failing, done.returncode == 0, done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    """Run fuzz rounds until ``--minutes`` have passed; report what they found."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="campaign length")
    parser.add_argument("-k", dest="selection", help="pytest -k expression (e.g. kubeconfig)")
    parser.add_argument("--seed", type=int, help="first round's seed (default: random)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rounds = total_passing = total_failing = failed_rounds = 0
    while time.monotonic() < deadline:
        # A round takes minutes (longer on a busy machine) and is never cut short by the
        # campaign's end; the timeout only catches a hang, which would itself be a finding.
        passing, failing, ok, output = _round(args.selection, seed, ROUND_TIMEOUT_SECONDS)
        rounds += 1
        total_passing += passing
        total_failing += failing
        status = "ok" if ok else "FAILED"
        print(
            f"round {rounds} (seed {seed}): {passing} passing examples, {failing} failing, "
            f"{status}, {time.monotonic() - started:.0f}s elapsed",
            flush=True,
        )
        if not ok:
            failed_rounds += 1
            print(output, flush=True)
        seed = (seed + 1) % 2**32
    minutes = (time.monotonic() - started) / 60
    print(
        f"campaign: {minutes:.1f} min, {rounds} rounds, {total_passing} passing examples, "
        f"{total_failing} failing examples, {failed_rounds} failed rounds"
    )
    return 1 if failed_rounds else 0


if __name__ == "__main__":
    raise SystemExit(main())
