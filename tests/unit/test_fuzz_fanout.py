"""Fuzzing fan-out values: batch sizes and failure thresholds as an operator or the scheduler
might write them (counts, percentages, lists, comma strings, JSON odds and ends).

Properties, for every value:

* parsing raises only ``FanoutConfigError``, within the profile's deadline;
* an accepted value's ``as_config()`` parses back to an equal value (what is stored reads
  back the same);
* planning any group with an accepted batch size puts every target in exactly one batch, in
  order, no batch empty; deciding after any batch never fails for consistent counts.

Settings come from ``tests.fuzz`` (``CAP_FUZZ_PROFILE``; ``python -m tests.fuzz`` runs a
campaign).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz import fuzz_settings, within_budget
from worker.core.fanout import (
    FanoutConfigError,
    decide_after_batch,
    parse_batch_size,
    parse_failure_threshold,
    plan_batches,
)

NUMBER_TEXT = st.one_of(
    st.integers(-5, 300).map(str),
    st.integers(-5, 300).map(lambda n: f"{n}%"),
    st.sampled_from(["", " ", "%", "5 %", " 7 ", "1.5", "1e3", "0x10", "+3", "10%%"]),
    st.sampled_from(["\u0663", "\uff11\uff10", "1,5,20%", "1,,2", ",", "100%", "0%", "101%"]),
    st.sampled_from(["9" * 30, "9" * 30 + "%"]),
    st.text(max_size=8),
)
STEPS = st.one_of(
    st.integers(-5, 300),
    st.integers(),
    NUMBER_TEXT,
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
)
VALUES = st.one_of(
    STEPS,
    st.lists(STEPS, max_size=5),
    st.tuples(STEPS, STEPS),
    st.dictionaries(st.text(max_size=3), STEPS, max_size=2),
    st.binary(max_size=4),
)


def _parse(parse: Callable[[Any], Any], value: Any) -> Any:
    try:
        with within_budget():
            return parse(value)
    except FanoutConfigError:
        return None


@fuzz_settings(max_examples=200)
@given(value=VALUES, total=st.integers(1, 120))
def test_batch_sizes_parse_cleanly_round_trip_and_plan_every_target_once(
    value: Any, total: int
) -> None:
    batch_size = _parse(parse_batch_size, value)
    event("accepted" if batch_size is not None else "refused")
    if batch_size is None:
        return
    assert parse_batch_size(batch_size.as_config()) == batch_size
    targets = [f"t{i}" for i in range(total)]
    batches = plan_batches(targets, batch_size)
    assert [t for batch in batches for t in batch] == targets
    assert all(batches)


@fuzz_settings(max_examples=200)
@given(value=VALUES, total=st.integers(1, 120), data=st.data())
def test_failure_thresholds_parse_cleanly_round_trip_and_decide(
    value: Any, total: int, data: st.DataObject
) -> None:
    threshold = _parse(parse_failure_threshold, value)
    event("accepted" if threshold is not None else "refused")
    if threshold is None:
        return
    assert parse_failure_threshold(threshold.as_config()) == threshold
    batch_size = data.draw(st.integers(1, total))
    batch_failed = data.draw(st.integers(0, batch_size))
    failed_so_far = data.draw(st.integers(batch_failed, total))
    decision = decide_after_batch(
        total_targets=total,
        failed_so_far=failed_so_far,
        batch_size=batch_size,
        batch_failed=batch_failed,
        threshold=threshold,
    )
    assert decision.halt == (decision.reason is not None)


# Found by this fuzzer: int() refuses strings of more than 4300 digits with a plain ValueError
# (CVE-2020-10735 mitigation), which escaped parse_batch_size/parse_failure_threshold and made
# `certautopilot groups add --batch-size 999...` exit 1 with a traceback.
@pytest.mark.parametrize("value", ["9" * 5000, "9" * 5000 + "%", ["1", "9" * 5000]])
def test_a_number_too_long_to_convert_is_a_config_error(value: Any) -> None:
    for parse in (parse_batch_size, parse_failure_threshold):
        if isinstance(value, list) and parse is parse_failure_threshold:
            continue
        with pytest.raises(FanoutConfigError):
            parse(value)
