"""Find (or build once) the ``helm`` binary the chart tests run.

Order of precedence:
1. ``HELM_BIN`` names an executable: use it, never build.
2. The versioned cache ``$XDG_CACHE_HOME/certautopilot/tools/helm-<version>/helm``
   (``~/.cache`` when XDG_CACHE_HOME is unset): use it when present, otherwise build it there
   with ``build-helm.sh`` (``go install`` from the Go module proxy, a few minutes on 2 cores).

A file lock next to the cache folder makes concurrent test runs wait for one build.
``python -m tests.testenv.helm`` builds it ahead of a test run and prints its path.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

HELM_VERSION = "3.22.0"
BUILD_SCRIPT = Path(__file__).with_name("build-helm.sh")


class HelmError(RuntimeError):
    """helm is missing and could not be provided."""


def helm_cache_path(environ: Mapping[str, str]) -> Path:
    """Return where the cached helm binary lives (it may not exist yet)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    return Path(base).expanduser() / "certautopilot" / "tools" / f"helm-{HELM_VERSION}" / "helm"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_helm(
    environ: Mapping[str, str], *, build: bool = True, progress: TextIO | None = None
) -> Path:
    """Return a usable helm executable, building it into the cache when allowed and missing."""
    override = environ.get("HELM_BIN")
    if override:
        if not _executable(Path(override)):
            raise HelmError(
                f"HELM_BIN={override} is not an executable file; point it at a helm v3 binary "
                "or unset it to build helm from the Go module proxy"
            )
        return Path(override)
    target = helm_cache_path(environ)
    if _executable(target):
        return target
    if not build:
        raise HelmError(
            f"helm is not at {target}; run `python -m tests.testenv.helm` to build it "
            "or set HELM_BIN"
        )
    return _build_locked(target, environ, progress or sys.stderr)


def _build_locked(target: Path, environ: Mapping[str, str], progress: TextIO) -> Path:
    """Build helm into `target` unless another process does; either way wait for it."""
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent.parent / f".{target.parent.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[helm] another process is building {target}; waiting", file=progress)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not _executable(target):  # the other process may have built it meanwhile
            _run_build_script(target.parent, environ, progress)
        if not _executable(target):
            raise HelmError(f"{BUILD_SCRIPT.name} finished but {target} is missing")
        return target


def _run_build_script(folder: Path, environ: Mapping[str, str], progress: TextIO) -> None:
    """Run build-helm.sh, echoing its output and failing with its last lines."""
    started = time.monotonic()
    print(f"[helm] building helm v{HELM_VERSION} into {folder} (one time)", file=progress)
    last_lines: deque[str] = deque(maxlen=40)
    env = {**environ, "CAP_HELM_VERSION": HELM_VERSION}
    try:
        with subprocess.Popen(
            ["bash", str(BUILD_SCRIPT), str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        ) as build:
            assert build.stdout is not None
            for line in build.stdout:
                last_lines.append(line)
                progress.write(line)
                progress.flush()
    except OSError as exc:
        raise HelmError(f"could not run {BUILD_SCRIPT}: {exc}") from exc
    if build.returncode != 0:
        raise HelmError(
            f"building helm failed (exit {build.returncode}); install Go or set HELM_BIN. "
            f"Last lines:\n{''.join(last_lines).rstrip()}"
        )
    print(f"[helm] built in {time.monotonic() - started:.0f}s", file=progress)


if __name__ == "__main__":
    print(find_helm(os.environ))
