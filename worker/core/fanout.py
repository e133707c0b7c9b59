"""Plan a group fan-out into batches and decide after each batch whether to go on (pure).

The semantics follow Ansible's ``serial`` and ``max_fail_percentage`` (DESIGN.md, decision 4):

Batch size
    A count (``5``), a percentage of the *whole group* (``"25%"``), or a progressive list
    (``[1, 5, "20%"]``) whose steps give the sizes of the first, second, third... batch, the
    last step repeating until every target is planned. A percentage is rounded up and is
    never less than one target. The last batch holds whatever remains. ``"100%"`` is one
    batch with every target. Zero, negative, above 100%, non-integer and empty-list values
    are configuration errors. Comma-separated strings (``"1,5,20%"``) are accepted for CLIs.

Failure threshold
    A count (``2``: halt once more than 2 targets have failed) or a percentage of the whole
    group (``"10%"``: halt once more than 10% have failed). The default ``0`` halts on the
    first failure; ``"100%"`` never halts on the threshold.

Decision after each batch
    The run halts when the cumulative number of failed targets *strictly exceeds* the
    threshold (count: ``failed > N``; percentage: ``failed / total * 100 > P``), or when every
    target of the batch just finished failed (whatever the threshold: the targets are probably
    all broken the same way). A halted run records the remaining targets as skipped; that is
    the caller's job, as is reading the failure counts from the database.

An empty group cannot be planned (FanoutConfigError).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# ASCII digits only: int() would also read full-width and other scripts' digits (U+FF11).
_PERCENT_RE = re.compile(r"\s*([0-9]+)\s*%\s*\Z")
_COUNT_RE = re.compile(r"\s*([0-9]+)\s*\Z")
#: The largest count a batch size or failure threshold may be: far above any fleet, and small
#: enough to be stored and read back exactly by every database (JSON numbers above 2**53 are
#: not, on SQLite they come back as floats).
MAX_COUNT = 1_000_000


class FanoutConfigError(ValueError):
    """A batch size, failure threshold or target list cannot be used; the message says why."""


@dataclass(frozen=True, order=True)
class Percent:
    """A whole percentage, 0..100, of the group's total number of targets."""

    value: int

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise FanoutConfigError(f"a percentage must be a whole number, not {self.value!r}")
        if not 0 <= self.value <= 100:
            raise FanoutConfigError(f"a percentage must be between 0% and 100%, not {self.value}%")

    def of(self, total: int) -> int:
        """This percentage of total, rounded up."""
        return math.ceil(total * self.value / 100) if total else 0

    def __str__(self) -> str:
        return f"{self.value}%"


Step = int | Percent


@dataclass(frozen=True)
class BatchSize:
    """Batch sizes step by step; the last step repeats."""

    steps: tuple[Step, ...]

    def size_of_batch(self, index: int, total: int) -> int:
        """How many targets batch number `index` (0-based) takes from a group of `total`."""
        step = self.steps[min(index, len(self.steps) - 1)]
        return max(1, step.of(total)) if isinstance(step, Percent) else step

    def as_config(self) -> int | str | list[int | str]:
        """A JSON-friendly value that parse_batch_size reads back to an equal BatchSize."""
        values: list[int | str] = [s if isinstance(s, int) else str(s) for s in self.steps]
        return values[0] if len(values) == 1 else values

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)


@dataclass(frozen=True)
class FailureThreshold:
    """How many failed targets a run tolerates: a count or a percentage of the group."""

    limit: int | Percent

    def exceeded(self, failed: int, total: int) -> bool:
        """True when `failed` of `total` targets is strictly more than the threshold allows."""
        if isinstance(self.limit, Percent):
            # Integer comparison of failed/total*100 > P, exact for every total.
            return failed * 100 > self.limit.value * total
        return failed > self.limit

    def describe(self, total: int) -> str:
        """The threshold as an operator reads it, e.g. "2" or "10% = 3 of 30 targets"."""
        if isinstance(self.limit, Percent):
            allowed = self.limit.value * total // 100
            return f"{self.limit} = {allowed} of {total} targets"
        return str(self.limit)

    def as_config(self) -> int | str:
        """A JSON-friendly value that parse_failure_threshold reads back to an equal threshold."""
        return self.limit if isinstance(self.limit, int) else str(self.limit)

    def __str__(self) -> str:
        return str(self.limit)


@dataclass(frozen=True)
class BatchDecision:
    """What to do after a batch: halt (with the reason an operator reads) or go on."""

    halt: bool
    reason: str | None


def parse_batch_size(value: int | str | Sequence[int | str]) -> BatchSize:
    """Read a batch size: 5, "5", "25%", [1, 5, "20%"] or "1,5,20%"."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    if isinstance(value, str | int):
        return BatchSize((_parse_step(value),))
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise FanoutConfigError(
            f"batch size must be a count, a percentage or a list of them, not {value!r}"
        )
    if not value:
        raise FanoutConfigError("batch size list is empty; give at least one step, e.g. [1, '20%']")
    return BatchSize(tuple(_parse_step(v, position=i + 1) for i, v in enumerate(value)))


def _count_or_percent(value: object, where: str, example: str) -> int | Percent:
    """Read 5, "5" or "25%" (whole numbers only); the caller checks the lower bound."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FanoutConfigError(f"{where} must be a whole number or a percentage, not {value!r}")
    if isinstance(value, int):
        return _bounded(value, where)
    if len(value) > 32:  # also keeps int() below its 4300-digit limit (a plain ValueError)
        raise FanoutConfigError(
            f"{where} is {len(value)} characters long; a count or a percentage is a few digits"
        )
    if match := _COUNT_RE.match(value):
        return _bounded(int(match.group(1)), where)
    if match := _PERCENT_RE.match(value):
        percent = int(match.group(1))
        if percent > 100:
            raise FanoutConfigError(f"{where} {value!r} is more than 100%")
        return Percent(percent)
    raise FanoutConfigError(
        f"{where} {value!r} is neither a whole number ({example}) nor a percentage ({example}%)"
    )


def _bounded(count: int, where: str) -> int:
    if count > MAX_COUNT:
        raise FanoutConfigError(f"{where} {count} is more than {MAX_COUNT:,}; use a percentage")
    return count


def _parse_step(value: object, *, position: int | None = None) -> Step:
    where = f"batch size step {position}" if position else "batch size"
    step = _count_or_percent(value, where, "5")
    if (step.value if isinstance(step, Percent) else step) <= 0:
        raise FanoutConfigError(f"{where} must be at least 1 (or 1%), not {value!r}")
    return step


def parse_failure_threshold(value: int | str) -> FailureThreshold:
    """Read a failure threshold: 0, 2, "2" or "10%"."""
    limit = _count_or_percent(value, "failure threshold", "2")
    if isinstance(limit, int) and limit < 0:
        raise FanoutConfigError(f"failure threshold cannot be negative ({value!r})")
    return FailureThreshold(limit)


def plan_batches(target_ids: Sequence[str], batch_size: BatchSize) -> list[list[str]]:
    """Split targets into batches in their given order; every target lands in exactly one."""
    if not target_ids:
        raise FanoutConfigError("the group has no targets; add targets before distributing to it")
    duplicates = sorted(t for t, n in Counter(target_ids).items() if n > 1)
    if duplicates:
        raise FanoutConfigError(f"targets listed more than once: {', '.join(duplicates)}")
    total = len(target_ids)
    batches: list[list[str]] = []
    start = 0
    while start < total:
        size = batch_size.size_of_batch(len(batches), total)
        batches.append(list(target_ids[start : start + size]))
        start += size
    return batches


def decide_after_batch(
    *,
    total_targets: int,
    failed_so_far: int,
    batch_size: int,
    batch_failed: int,
    threshold: FailureThreshold,
) -> BatchDecision:
    """Halt or continue after a batch.

    `failed_so_far` counts every failed target of the run *including* this batch;
    `batch_size` and `batch_failed` describe the batch that just finished.
    """
    if not 0 <= batch_failed <= batch_size or batch_size < 1:
        raise ValueError(f"need 0 <= batch_failed ({batch_failed}) <= batch_size ({batch_size})")
    if not batch_failed <= failed_so_far <= total_targets:
        raise ValueError(
            f"need batch_failed ({batch_failed}) <= failed_so_far ({failed_so_far}) "
            f"<= total_targets ({total_targets})"
        )
    percent = _percent_text(failed_so_far, total_targets)
    if threshold.exceeded(failed_so_far, total_targets):
        return BatchDecision(
            halt=True,
            reason=(
                f"failure threshold exceeded ({failed_so_far} of {total_targets} failed, "
                f"threshold {threshold.describe(total_targets)})"
            ),
        )
    if batch_failed == batch_size:
        return BatchDecision(
            halt=True,
            reason=(
                f"every target of the last batch failed ({batch_failed} of {batch_size}); "
                f"{failed_so_far} of {total_targets} targets failed in all ({percent})"
            ),
        )
    return BatchDecision(halt=False, reason=None)


def _percent_text(part: int, total: int) -> str:
    share = part * 100 / total if total else 0.0
    return f"{share:.0f}%" if share == int(share) else f"{share:.1f}%"
