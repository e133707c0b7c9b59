"""Every test runs with a temporary HOME and CAP_DATA_DIR: nothing reaches the real home.

The settings' defaults live under ``~/.local/share/certautopilot``; a test that forgets to
point CAP_DATA_DIR elsewhere (or a worker process it starts, which inherits the environment)
would otherwise create files there. A session-wide temporary home covers the fixtures that
start before any test (session- and module-scoped servers and workers); each test then gets
its own.

The caches of the test tools (kube-apiserver, etcd, helm, pip's wheels) stay where they are:
XDG_CACHE_HOME is pinned to the real one before HOME changes, since building them again per
test would take minutes.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

_REAL_HOME = Path(os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir)
os.environ.setdefault("XDG_CACHE_HOME", str(_REAL_HOME / ".cache"))
# Go (building the test binaries once) puts its module cache under GOPATH, ~/go by default.
os.environ.setdefault("GOPATH", str(_REAL_HOME / "go"))


def _point_home_at(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CAP_DATA_DIR", str(home / "cap-data"))


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary HOME for everything set up before the first test's own."""
    home = tmp_path_factory.mktemp("session-home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _point_home_at(monkeypatch, home)
        yield home


@pytest.fixture(autouse=True)
def _test_home(
    _session_home: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """This test's own HOME, with CAP_DATA_DIR inside it (``tmp_path`` stays the test's own)."""
    home = tmp_path_factory.mktemp("home")
    _point_home_at(monkeypatch, home)
    return home
