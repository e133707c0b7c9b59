"""The embedded default's broker: kombu's SQLAlchemy transport (over SQLite), tuned for a
Celery worker.

Two changes to kombu's transport, both measured by ``python -m bench --embedded``:

* **Polling**: kombu looks at an idle queue every second; a message reaching an idle worker
  (a run's start, a batch callback, the first targets) waited up to that second. Here it
  is :data:`POLLING_INTERVAL` (one indexed SELECT per queue per interval on an idle worker).
* **Acknowledgements**: for a transport without an event loop Celery runs its blocking
  consumer loop, which calls ``drain_events(timeout=2.0)`` and performs the pool's
  acknowledgements (``task_acks_late``) only *between* two calls. Once every prefetched
  message was in work, nothing could be consumed until they were acknowledged, so each
  full prefetch window sat out the 2 s: a 200-target run took 8.3 s, its processing
  0.7 s. Here a drain returns after one polling interval, so acknowledgements and the next
  messages follow within it.

The broker URL stays ``sqla+sqlite:///…`` for the operator; :func:`celery_broker_url` maps it
onto this transport's alias for Celery and kombu.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as sqlalchemy_transport

__all__ = ["ALIAS", "POLLING_INTERVAL", "Transport", "celery_broker_url"]

#: Seconds between two looks at an empty queue, and the longest a drain blocks.
POLLING_INTERVAL = 0.1

#: The kombu transport alias of :class:`Transport` (what ``sqla+`` URLs are mapped onto).
ALIAS = "cap-sqla"

_OPERATOR_PREFIX = "sqla+"


class Transport(sqlalchemy_transport.Transport):  # type: ignore[misc]
    """kombu's SQLAlchemy transport with the polling and draining described above."""

    polling_interval = POLLING_INTERVAL

    # kombu's two base classes type this method differently; this is the virtual one's.
    def drain_events(self, connection: Any, timeout: Any = None) -> Any:  # type: ignore[override]
        # None means "block until a message" (callers that wait for one): left alone.
        if timeout is not None:
            timeout = min(timeout, self.polling_interval)
        return super().drain_events(connection, timeout=timeout)  # type: ignore[no-untyped-call]


TRANSPORT_ALIASES[ALIAS] = f"{__name__}:Transport"


def celery_broker_url(url: str) -> str:
    """``url`` as Celery should be given it: ``sqla+`` URLs use this module's transport."""
    if url.startswith(_OPERATOR_PREFIX):
        return f"{ALIAS}+{url[len(_OPERATOR_PREFIX) :]}"
    return url
