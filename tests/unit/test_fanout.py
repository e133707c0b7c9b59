"""Fan-out: batch sizes, failure thresholds, batch plans and halt decisions (Ansible semantics)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.fanout import (
    BatchDecision,
    BatchSize,
    FailureThreshold,
    FanoutConfigError,
    Percent,
    decide_after_batch,
    parse_batch_size,
    parse_failure_threshold,
    plan_batches,
)


def ids(n: int) -> list[str]:
    return [f"t{i:02d}" for i in range(n)]


def sizes(batches: list[list[str]]) -> list[int]:
    return [len(b) for b in batches]


# --- parsing batch sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "steps"),
    [
        (5, (5,)),
        ("5", (5,)),
        (" 7 ", (7,)),
        ("25%", (Percent(25),)),
        ("100%", (Percent(100),)),
        ("1%", (Percent(1),)),
        ([1, 5, "20%"], (1, 5, Percent(20))),
        (("2", "50%"), (2, Percent(50))),
        ("1,5,20%", (1, 5, Percent(20))),
        ("1, 5 , 20 %", (1, 5, Percent(20))),
    ],
)
def test_batch_sizes_parse_from_counts_percentages_and_lists(
    value: int | str | list[int | str], steps: tuple[int | Percent, ...]
) -> None:
    assert parse_batch_size(value) == BatchSize(steps)


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (0, "at least 1"),
        ("0", "at least 1"),
        ("0%", "at least 1"),
        (-3, "at least 1"),
        ("-3", "neither a whole number"),
        ("101%", "more than 100%"),
        ("150%", "more than 100%"),
        ([], "list is empty"),
        ("", "neither a whole number"),
        ("abc", "neither a whole number"),
        ("2.5", "neither a whole number"),
        ("12.5%", "neither a whole number"),
        (2.5, "count, a percentage or a list"),
        (True, "whole number or a percentage"),
        ([1, 0], "step 2 must be at least 1"),
        ([1, "x"], "step 2"),
        ([[1]], "whole number or a percentage"),
        (None, "count, a percentage or a list"),
        ("1,,2", "step 2"),
    ],
)
def test_bad_batch_sizes_are_configuration_errors(value: object, complaint: str) -> None:
    with pytest.raises(FanoutConfigError, match=complaint):
        parse_batch_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [5, "25%", [1, 5, "20%"], ["10%", 3]])
def test_a_batch_size_round_trips_through_its_config_value(
    value: int | str | list[int | str],
) -> None:
    batch_size = parse_batch_size(value)
    assert parse_batch_size(batch_size.as_config()) == batch_size
    assert parse_batch_size(str(batch_size)) == batch_size


# --- parsing thresholds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (0, 0),
        ("0", 0),
        (2, 2),
        (" 3 ", 3),
        ("10%", Percent(10)),
        ("0%", Percent(0)),
        ("100%", Percent(100)),
    ],
)
def test_failure_thresholds_parse_from_counts_and_percentages(
    value: int | str, limit: int | Percent
) -> None:
    threshold = parse_failure_threshold(value)
    assert threshold == FailureThreshold(limit)
    assert parse_failure_threshold(threshold.as_config()) == threshold


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (-1, "cannot be negative"),
        ("-1", "neither a whole number"),
        ("101%", "more than 100%"),
        ("ten", "neither a whole number"),
        ("", "neither a whole number"),
        (1.5, "whole number or a percentage"),
        (False, "whole number or a percentage"),
        ([1], "whole number or a percentage"),
    ],
)
def test_bad_failure_thresholds_are_configuration_errors(value: object, complaint: str) -> None:
    with pytest.raises(FanoutConfigError, match=complaint):
        parse_failure_threshold(value)  # type: ignore[arg-type]


def test_a_percentage_outside_0_to_100_cannot_even_be_constructed() -> None:
    with pytest.raises(FanoutConfigError):
        Percent(101)
    with pytest.raises(FanoutConfigError):
        Percent(-1)


# --- planning -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "batch_size", "expected_sizes"),
    [
        (10, 3, [3, 3, 3, 1]),
        (10, 10, [10]),
        (10, 50, [10]),
        (10, 1, [1] * 10),
        (10, "100%", [10]),
        (10, "50%", [5, 5]),
        (10, "25%", [3, 3, 3, 1]),  # 2.5 rounds up to 3
        (10, "1%", [1] * 10),  # 0.1 rounds up, and a batch is never empty
        (3, "34%", [2, 1]),
        (30, [1, 5, "20%"], [1, 5, 6, 6, 6, 6]),  # the last step repeats
        (30, ["10%", "50%"], [3, 15, 12]),
        (4, [1, 5, "20%"], [1, 3]),
        (1, [2, 3], [1]),
        (7, [1, 2, 100], [1, 2, 4]),
    ],
)
def test_targets_are_planned_into_batches_of_the_configured_sizes(
    total: int, batch_size: int | str | list[int | str], expected_sizes: list[int]
) -> None:
    targets = ids(total)
    batches = plan_batches(targets, parse_batch_size(batch_size))
    assert sizes(batches) == expected_sizes
    assert [t for batch in batches for t in batch] == targets


def test_an_empty_group_is_a_configuration_error() -> None:
    with pytest.raises(FanoutConfigError, match="no targets"):
        plan_batches([], parse_batch_size(5))


def test_a_target_listed_twice_is_a_configuration_error() -> None:
    with pytest.raises(FanoutConfigError, match="more than once: t01"):
        plan_batches(["t00", "t01", "t02", "t01"], parse_batch_size(2))


# --- deciding -----------------------------------------------------------------------------------


def decide(
    total: int, failed: int, batch: int, batch_failed: int, threshold: int | str
) -> BatchDecision:
    return decide_after_batch(
        total_targets=total,
        failed_so_far=failed,
        batch_size=batch,
        batch_failed=batch_failed,
        threshold=parse_failure_threshold(threshold),
    )


@pytest.mark.parametrize(
    ("total", "failed", "batch", "batch_failed", "threshold", "halt"),
    [
        # count thresholds: halt only when failures strictly exceed N
        (30, 0, 5, 0, 0, False),
        (30, 1, 5, 1, 0, True),
        (30, 2, 5, 2, 2, False),
        (30, 3, 5, 1, 2, True),
        (30, 3, 10, 3, 3, False),
        # percentage thresholds: failed/total*100 > P
        (30, 3, 10, 3, "10%", False),  # exactly 10%
        (30, 4, 10, 1, "10%", True),  # 13.3%
        (10, 1, 5, 1, "10%", False),
        (10, 2, 5, 1, "10%", True),
        (3, 1, 1, 0, "34%", False),  # 33.3% of 3 is not more than 34%
        (3, 2, 2, 1, "50%", True),
        (30, 29, 10, 9, "100%", False),
        (30, 1, 5, 1, "0%", True),
        # every target of the batch failed: halt whatever the threshold
        (30, 1, 1, 1, "100%", True),
        (30, 5, 5, 5, 10, True),
        (30, 30, 30, 30, "100%", True),
        (30, 4, 5, 4, 10, False),
    ],
)
def test_the_run_halts_only_past_the_threshold_or_when_a_whole_batch_fails(
    total: int, failed: int, batch: int, batch_failed: int, threshold: int | str, halt: bool
) -> None:
    decision = decide(total, failed, batch, batch_failed, threshold)
    assert decision.halt is halt
    assert (decision.reason is not None) is halt


def test_a_count_threshold_reason_reads_as_a_sentence() -> None:
    decision = decide(30, 3, 10, 3, 2)
    assert decision.reason == "failure threshold exceeded (3 of 30 failed, threshold 2)"


def test_a_percentage_threshold_reason_shows_the_allowed_number() -> None:
    decision = decide(30, 4, 10, 2, "10%")
    assert decision.reason == (
        "failure threshold exceeded (4 of 30 failed, threshold 10% = 3 of 30 targets)"
    )


def test_a_whole_failed_batch_reason_says_so() -> None:
    decision = decide(30, 5, 5, 5, "50%")
    assert decision.reason == (
        "every target of the last batch failed (5 of 5); 5 of 30 targets failed in all (16.7%)"
    )


@pytest.mark.parametrize(
    ("total", "failed", "batch", "batch_failed"),
    [(10, 1, 5, 6), (10, 0, 5, 1), (10, 11, 5, 1), (10, 1, 0, 0), (10, -1, 5, 0)],
)
def test_impossible_counts_are_programming_errors(
    total: int, failed: int, batch: int, batch_failed: int
) -> None:
    with pytest.raises(ValueError, match="need"):
        decide(total, failed, batch, batch_failed, 0)


# --- properties ---------------------------------------------------------------------------------

step = st.one_of(
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=100).map(lambda p: f"{p}%"),
)
steps = st.one_of(step, st.lists(step, min_size=1, max_size=5))
thresholds = st.one_of(
    st.integers(min_value=0, max_value=250),
    st.integers(min_value=0, max_value=100).map(lambda p: f"{p}%"),
)
PROPERTY = settings(max_examples=300, deadline=None)


@PROPERTY
@given(total=st.integers(min_value=1, max_value=200), batch_size=steps)
def test_every_target_is_planned_exactly_once_in_order(
    total: int, batch_size: int | str | list[int | str]
) -> None:
    targets = ids(total)
    batches = plan_batches(targets, parse_batch_size(batch_size))
    assert [t for batch in batches for t in batch] == targets
    assert all(batches)


@PROPERTY
@given(total=st.integers(min_value=1, max_value=200), batch_size=steps)
def test_batch_sizes_follow_the_steps_and_only_the_last_batch_is_short(
    total: int, batch_size: int | str | list[int | str]
) -> None:
    parsed = parse_batch_size(batch_size)
    batches = plan_batches(ids(total), parsed)
    for index, batch in enumerate(batches):
        step_value = parsed.steps[min(index, len(parsed.steps) - 1)]
        expected = (
            max(1, math.ceil(total * step_value.value / 100))
            if isinstance(step_value, Percent)
            else step_value
        )
        if index < len(batches) - 1:
            assert len(batch) == expected
        else:
            assert 1 <= len(batch) <= expected


@PROPERTY
@given(
    total=st.integers(min_value=1, max_value=200),
    data=st.data(),
    threshold=thresholds,
)
def test_the_threshold_rule_is_exactly_strictly_more_than(
    total: int, data: st.DataObject, threshold: int | str
) -> None:
    failed = data.draw(st.integers(min_value=0, max_value=total))
    batch = data.draw(st.integers(min_value=1, max_value=total))
    batch_failed = data.draw(st.integers(min_value=0, max_value=min(batch, failed)))
    decision = decide(total, failed, batch, batch_failed, threshold)
    if isinstance(threshold, str):
        over = Fraction(failed, total) * 100 > int(threshold[:-1])
    else:
        over = failed > threshold
    assert decision.halt is (over or batch_failed == batch)


@PROPERTY
@given(
    total=st.integers(min_value=2, max_value=100),
    data=st.data(),
    threshold=thresholds,
)
def test_more_failures_never_turn_a_halt_into_a_go(
    total: int, data: st.DataObject, threshold: int | str
) -> None:
    failed = data.draw(st.integers(min_value=0, max_value=total - 1))
    batch = data.draw(st.integers(min_value=2, max_value=total))
    batch_failed = data.draw(st.integers(min_value=0, max_value=min(batch - 1, failed)))
    before = decide(total, failed, batch, batch_failed, threshold)
    after = decide(total, failed + 1, batch, batch_failed, threshold)
    assert not (before.halt and not after.halt)
