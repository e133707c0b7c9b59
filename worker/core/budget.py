"""How long one target can take at worst, computed from the settings' own numbers (pure).

A message starts a target only while that target can still finish inside the task's soft
time limit, and the settings refuse a soft limit that cannot hold one target at its worst
(issue 17 §3). The worst case is what the retry settings allow, nothing guessed:

* one Kubernetes API call: attempts go on while the retry budget lasts, and the last one
  started may take a whole connect + read timeout;
* a deploy or rollback: up to ``MAX_CONFLICT_RETRIES + 1`` rounds of read-then-write (a 409
  Conflict starts the next round);
* the database steps inside a target (key, credential, snapshot save, written fingerprint):
  each rides out an outage for at most the database retry time (``DATABASE_RETRY_SECONDS``,
  or less with a short lease);
* after the last target, the message records its outcomes, gives back what it did not start
  and checks its batch: three more database steps.

Verify serving (worker.core.serving) is not added to a target's worst case: it runs once per
message, after the message's writes and for all of its targets concurrently, and it ends by
:meth:`WorstCase.serving_end` — the soft limit minus the closing steps — whatever the
targets' deadlines say (a deadline that does not fit is cut, and the result says so). Adding
the default 120 s deadline per target would have let a message start one target only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DATABASE_RETRY_SECONDS",
    "DATABASE_STEPS_AFTER_TARGETS",
    "DATABASE_STEPS_PER_TARGET",
    "MAX_CONFLICT_RETRIES",
    "WorstCase",
    "api_call_seconds",
    "worst_case",
]

#: Re-reads and re-writes after a 409 Conflict before a deploy or rollback gives up.
MAX_CONFLICT_RETRIES = 3
#: API calls in one round of a deploy or rollback: read the Secret, then write it.
CALLS_PER_ROUND = 2
#: The most one database step inside a task retries through an outage before it gives up
#: (the task then fails and Celery retries it; the claims' leases expire and the reaper
#: re-sends them). The settings shorten it below the lease (TaskSettings).
DATABASE_RETRY_SECONDS = 20.0
#: Database steps of one target: the key, the credential, the snapshot, the written fingerprint.
DATABASE_STEPS_PER_TARGET = 4
#: After the last target: record the outcomes, give back the unstarted, check the batch.
DATABASE_STEPS_AFTER_TARGETS = 3


def api_call_seconds(
    *, attempts: int, retry_max_seconds: float, connect_timeout: float, read_timeout: float
) -> float:
    """The longest one API call can take.

    With retries, none starts once ``retry_max_seconds`` have passed (its wait included,
    however long a server's Retry-After asks for), and the last attempt started runs to its
    timeouts. Without retries, the one attempt's timeouts.
    """
    per_attempt = connect_timeout + read_timeout
    if attempts <= 1:
        return per_attempt
    return retry_max_seconds + per_attempt


@dataclass(frozen=True)
class WorstCase:
    """A target's and a message's longest time, with the numbers they come from."""

    api_call: float
    database_step: float
    target: float
    after_targets: float

    @property
    def message_minimum(self) -> float:
        """The least soft time limit that holds one target at its worst, and the record."""
        return self.target + self.after_targets

    def serving_end(self, soft_time_limit: float) -> float:
        """Seconds after a message started by which its verify-serving must have ended: what
        is left of the soft limit once the closing steps are reserved."""
        return soft_time_limit - self.after_targets

    def explain(self) -> str:
        """The computation in words, for an error message."""
        rounds = MAX_CONFLICT_RETRIES + 1
        return (
            f"one target may take {self.target:g}s ({rounds} conflict rounds x "
            f"{CALLS_PER_ROUND} API calls x {self.api_call:g}s per call, plus "
            f"{DATABASE_STEPS_PER_TARGET} database steps x {self.database_step:g}s of "
            f"outage retries), and recording afterwards up to {self.after_targets:g}s"
        )


def worst_case(
    *,
    attempts: int,
    retry_max_seconds: float,
    connect_timeout: float,
    read_timeout: float,
    database_retry_seconds: float = DATABASE_RETRY_SECONDS,
) -> WorstCase:
    """The worst case of one target and of a message's closing steps, from the settings."""
    call = api_call_seconds(
        attempts=attempts,
        retry_max_seconds=retry_max_seconds,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    api = (MAX_CONFLICT_RETRIES + 1) * CALLS_PER_ROUND * call
    return WorstCase(
        api_call=call,
        database_step=database_retry_seconds,
        target=api + DATABASE_STEPS_PER_TARGET * database_retry_seconds,
        after_targets=DATABASE_STEPS_AFTER_TARGETS * database_retry_seconds,
    )
