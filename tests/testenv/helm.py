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

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from tests.testenv.process import exclusive_lock, stream_checked

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
    folder = target.parent
    lock = folder.parent / f".{folder.name}.lock"
    with exclusive_lock(lock, progress, f"[helm] another process is building {target}; waiting"):
        if _executable(target):  # the other process built it meanwhile
            return target
        started = time.monotonic()
        progress.write(f"[helm] building helm v{HELM_VERSION} into {folder} (one time)\n")
        progress.flush()
        stream_checked(
            ["bash", str(BUILD_SCRIPT), str(folder)],
            "build helm with Go (install Go or set HELM_BIN)",
            env={**environ, "CAP_HELM_VERSION": HELM_VERSION},
            progress=progress,
            error=HelmError,
        )
        if not _executable(target):
            raise HelmError(f"{BUILD_SCRIPT.name} finished but {target} is missing")
        progress.write(f"[helm] built in {time.monotonic() - started:.0f}s\n")
        progress.flush()
        return target


if __name__ == "__main__":
    print(find_helm(os.environ))
