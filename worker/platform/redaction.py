"""Connection URLs made safe for messages and logs: the one place passwords are masked.

SQLAlchemy's URL parser handles every URL the worker is configured with (database URLs,
``redis://``, ``sqla+sqlite://`` and ``db+postgresql://`` Celery URLs), so its
``render_as_string(hide_password=True)`` does the masking. kombu's ``maybe_sanitize_url``
would do for broker URLs only and masks with ``**``; one mask for every URL reads better.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["redact_url"]


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for messages and logs).

    A Sentinel broker URL lists several URLs separated by ``;``: each is masked.
    """
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Nothing to mask by position: the text may be a password pasted into the wrong
        # variable, or hold one anywhere. Show nothing; the error says what was expected.
        return "<unparseable URL>"
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)
