"""A target's worst case comes from the settings' numbers, and a soft limit that cannot hold it
is refused at start, naming them (issue 17 §3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.budget import (
    DATABASE_STEPS_AFTER_TARGETS,
    DATABASE_STEPS_PER_TARGET,
    MAX_CONFLICT_RETRIES,
    api_call_seconds,
    worst_case,
)
from worker.platform.settings import SettingsError, load_settings, target_worst_case

HOME = {"HOME": "/nonexistent-home"}


def test_one_call_is_bounded_by_its_retry_budget_plus_the_last_attempt() -> None:
    # 5 attempts of up to 20 s would be 100 s, but no retry starts after 30 s.
    assert api_call_seconds(
        attempts=5, retry_max_seconds=30, connect_timeout=5, read_timeout=15
    ) == 50
    # One attempt: no retries, only its own timeouts.
    assert api_call_seconds(
        attempts=1, retry_max_seconds=30, connect_timeout=5, read_timeout=15
    ) == 20
    # However long a server's Retry-After: no retry starts after the budget.
    assert api_call_seconds(
        attempts=2, retry_max_seconds=300, connect_timeout=1, read_timeout=2
    ) == 300 + 3


def test_the_defaults_hold_one_target_and_say_how() -> None:
    settings = load_settings(HOME)
    worst = target_worst_case(settings.tasks, settings.kube)
    rounds = MAX_CONFLICT_RETRIES + 1
    assert worst.target == rounds * 2 * 50 + DATABASE_STEPS_PER_TARGET * 20
    assert worst.after_targets == DATABASE_STEPS_AFTER_TARGETS * 20
    assert settings.tasks.soft_time_limit >= worst.message_minimum
    assert "4 conflict rounds x 2 API calls x 50s per call" in worst.explain()


def test_a_soft_limit_that_cannot_hold_a_target_is_refused_naming_the_numbers() -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({**HOME, "CAP_TASK_SOFT_TIME_LIMIT": "240", "CAP_TASK_TIME_LIMIT": "300"})
    message = str(refused.value)
    assert "CAP_TASK_SOFT_TIME_LIMIT=240 cannot hold one target at its worst" in message
    assert "must be at least 540" in message
    assert "CAP_KUBE_RETRY_MAX_SECONDS" in message  # the way out, not only the complaint


def test_tighter_retries_allow_a_shorter_soft_limit() -> None:
    settings = load_settings(
        {
            **HOME,
            "CAP_TASK_SOFT_TIME_LIMIT": "115",
            "CAP_TASK_TIME_LIMIT": "130",
            "CAP_KUBE_RETRY_ATTEMPTS": "2",
            "CAP_KUBE_RETRY_MAX_SECONDS": "3",
            "CAP_KUBE_CONNECT_TIMEOUT": "2",
            "CAP_KUBE_READ_TIMEOUT": "5",
            "CAP_STALE_AFTER": "10",
        }
    )
    worst = target_worst_case(settings.tasks, settings.kube)
    # 8 calls x (3 + 7) s, 4 database steps x 5 s (half the 10 s lease).
    assert (worst.target, worst.after_targets) == (8 * 10 + 4 * 5, 3 * 5)
    assert settings.tasks.database_retry_seconds == 5


@given(
    attempts=st.integers(1, 20),
    budget=st.floats(0.1, 600),
    connect=st.floats(0.1, 60),
    read=st.floats(0.1, 120),
    extra_attempts=st.integers(0, 5),
    extra_budget=st.floats(0, 600),
)
def test_more_retries_never_shrink_the_worst_case(
    attempts: int,
    budget: float,
    connect: float,
    read: float,
    extra_attempts: int,
    extra_budget: float,
) -> None:
    base = worst_case(
        attempts=attempts, retry_max_seconds=budget, connect_timeout=connect, read_timeout=read
    )
    more = worst_case(
        attempts=attempts + extra_attempts,
        retry_max_seconds=budget + extra_budget,
        connect_timeout=connect,
        read_timeout=read,
    )
    assert more.target >= base.target
    # Never less than one attempt per call, whatever the budget.
    assert base.api_call >= connect + read
