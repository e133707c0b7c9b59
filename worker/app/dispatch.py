"""What moves runs forward: the messages a run sends (implemented with Celery in tasks/), and
queueing the next stacked distribution of a certificate after a run succeeded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.orm import Session

from models import queries
from models.entities import Distribution
from models.enums import RunAction

__all__ = ["Dispatcher", "queue_next_stacked"]


class Dispatcher(Protocol):
    """Sends the messages that move runs forward (implemented with Celery in tasks/)."""

    def start(self, run_id: str) -> None:
        """Ask a worker to start ``run_id``."""

    def process_targets(self, run_id: str, target_ids: Sequence[str]) -> None:
        """Ask workers to process these targets of ``run_id`` in parallel."""

    def advance(self, run_id: str, batch_index: int) -> None:
        """Ask a worker to decide what follows batch ``batch_index`` of ``run_id``."""


def queue_next_stacked(session: Session, distribution: Distribution, run_id: str) -> str | None:
    """Queue an execute of the distribution stacked after this one (if any); its run id.

    The caller sends the start message after its transaction committed.
    """
    following = queries.next_distribution(session, distribution)
    if following is None:
        return None
    parent = queries.get_run(session, run_id)
    run = queries.create_run(
        session,
        distribution_id=following.id,
        action=RunAction.EXECUTE,
        cascade=True,
        parent_run_id=run_id,
        # The stack is one deployment: every stacked run (and the webhook that reports it)
        # carries the revision its first run was enqueued with, not one renewed since.
        certificate_revision_id=(
            parent.certificate_revision_id
            if following.certificate_id == distribution.certificate_id
            else None
        ),
    )
    return run.id
