"""Find (or build once) the kube-apiserver and etcd binaries the test clusters run.

Order of precedence:
1. ``KUBEBUILDER_ASSETS`` names a folder holding ``kube-apiserver`` and ``etcd`` (what
   ``setup-envtest`` gives a user with internet): use those, never build.
2. The versioned cache folder ``$XDG_CACHE_HOME/certautopilot/testenv/k8s-X-etcd-Y/``
   (``~/.cache`` when XDG_CACHE_HOME is unset): use it when both binaries are there,
   otherwise build them into it with ``build-binaries.sh`` from the Go module proxy.

A file lock next to the cache folder makes concurrent test runs wait for one build instead
of starting a second one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tests.testenv.process import exclusive_lock, stream_checked

K8S_VERSION = "1.37.2"
ETCD_VERSION = "3.7.3"
BUILD_SCRIPT = Path(__file__).with_name("build-binaries.sh")


class BinariesError(RuntimeError):
    """The Kubernetes test binaries are missing and could not be provided."""


@dataclass(frozen=True)
class Binaries:
    """Paths of the two executables a test cluster needs."""

    kube_apiserver: Path
    etcd: Path

    @property
    def folder(self) -> Path:
        """The folder holding both binaries (usable as KUBEBUILDER_ASSETS)."""
        return self.kube_apiserver.parent


def cache_dir(environ: Mapping[str, str]) -> Path:
    """Return the versioned cache folder the build writes to (it may not exist yet)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    root = Path(base).expanduser()
    return root / "certautopilot" / "testenv" / f"k8s-{K8S_VERSION}-etcd-{ETCD_VERSION}"


def _complete(folder: Path) -> Binaries | None:
    binaries = Binaries(folder / "kube-apiserver", folder / "etcd")
    for path in (binaries.kube_apiserver, binaries.etcd):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return None
    return binaries


def find_binaries(
    environ: Mapping[str, str], *, build: bool = True, progress: TextIO | None = None
) -> Binaries:
    """Return usable binaries, building them into the cache when allowed and missing."""
    assets = environ.get("KUBEBUILDER_ASSETS")
    if assets:
        found = _complete(Path(assets))
        if found is None:
            raise BinariesError(
                f"KUBEBUILDER_ASSETS={assets} must be a folder holding executable "
                "'kube-apiserver' and 'etcd' files (as `setup-envtest use -p path` prints); "
                "fix the path or unset KUBEBUILDER_ASSETS to build them with Go"
            )
        return found
    folder = cache_dir(environ)
    found = _complete(folder)
    if found is not None:
        return found
    if not build:
        raise BinariesError(
            f"kube-apiserver and etcd are not in {folder}; run "
            "`python -m tests.testenv binaries` to build them or set KUBEBUILDER_ASSETS"
        )
    return build_binaries(folder, environ, progress=progress or sys.stderr)


def build_binaries(folder: Path, environ: Mapping[str, str], *, progress: TextIO) -> Binaries:
    """Build both binaries into `folder` under a file lock, streaming the build's output."""
    lock = folder.parent / f".{folder.name}.lock"
    with exclusive_lock(lock, progress, f"[testenv] another process is building {folder}; waiting"):
        found = _complete(folder)  # the other process may have finished the job
        if found is not None:
            return found
        started = time.monotonic()
        progress.write(
            f"[testenv] building kube-apiserver v{K8S_VERSION} and etcd v{ETCD_VERSION} into "
            f"{folder} (a one-time cost: ~10 minutes on 2 cores)\n"
        )
        progress.flush()
        env = {**environ, "CAP_K8S_VERSION": K8S_VERSION, "CAP_ETCD_VERSION": ETCD_VERSION}
        stream_checked(
            ["bash", str(BUILD_SCRIPT), str(folder)],
            "build kube-apiserver and etcd with Go (install Go or set KUBEBUILDER_ASSETS)",
            env=env,
            progress=progress,
            error=BinariesError,
        )
        progress.write(f"[testenv] built in {time.monotonic() - started:.0f}s\n")
        progress.flush()
        found = _complete(folder)
        if found is None:
            raise BinariesError(f"{BUILD_SCRIPT.name} succeeded but {folder} is still incomplete")
        return found
