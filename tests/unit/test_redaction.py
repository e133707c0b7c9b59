"""Connection URLs in messages and logs: passwords masked, nothing unparseable echoed."""

from __future__ import annotations

import pytest

from worker.platform.redaction import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("db+postgresql+psycopg://worker:hunter2@db/cap", "db+postgresql+psycopg://worker:***@db/cap"),
        ("rediss://:pw@h:6380/1?ssl_cert_reqs=required", "rediss://:***@h:6380/1?ssl_cert_reqs=required"),
        (
            "sentinel://:pw@h1:26379;sentinel://:pw@h2:26379",
            "sentinel://:***@h1:26379;sentinel://:***@h2:26379",
        ),
        ("not a url", "<unparseable URL>"),
        ("SuperSecretPw", "<unparseable URL>"),
        ("notaurl:SuperSecretPw", "<unparseable URL>"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_an_unparseable_url_with_credentials_is_not_echoed() -> None:
    assert redact_url("carrier pigeon://user:topsecret@coop") == "<unparseable URL>"
