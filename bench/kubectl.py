"""Baseline (a), what an operator does by hand: a shell loop of kubectl, one target at a time.

Which kubectl: ``CAP_BENCH_KUBECTL`` when set, else the one on ``PATH``, else one built once
from the Go module proxy at the test apiserver's own version (``build-kubectl.sh``, the
wrapper-module approach of ``tests/testenv/build-binaries.sh``) into the same cache as the
apiserver binaries. Debian's ``kubernetes-client`` is 1.20: far outside kubectl's
one-minor-version skew policy against a 1.37 apiserver, so it is not used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.testenv.binaries import K8S_VERSION, cache_dir
from tests.testenv.process import exclusive_lock

BUILD_SCRIPT = Path(__file__).with_name("build-kubectl.sh")

#: The loop an operator types; $KUBECTL, $CERT and $KEY come from the environment.
LOOP = r"""
while read -r kubeconfig namespace name; do
  "$KUBECTL" --kubeconfig "$kubeconfig" create secret tls "$name" \
      --cert="$CERT" --key="$KEY" -n "$namespace" --dry-run=client -o yaml \
    | "$KUBECTL" --kubeconfig "$kubeconfig" apply -f - >/dev/null || exit 1
done
"""


class KubectlError(RuntimeError):
    """No kubectl could be found or built, or the loop failed."""


def find_kubectl(environ: Mapping[str, str]) -> Path:
    """Return a kubectl executable, building one into the cache when none is installed."""
    configured = environ.get("CAP_BENCH_KUBECTL")
    if configured:
        path = Path(configured)
        if not os.access(path, os.X_OK):
            raise KubectlError(f"CAP_BENCH_KUBECTL={configured} is not an executable file")
        return path
    on_path = shutil.which("kubectl", path=environ.get("PATH"))
    if on_path:
        return Path(on_path)
    built = cache_dir(environ).parent / f"kubectl-{K8S_VERSION}" / "kubectl"
    if os.access(built, os.X_OK):
        return built
    with exclusive_lock(built.parent.with_suffix(".lock"), sys.stderr, "waiting for kubectl"):
        if not os.access(built, os.X_OK):
            print(f"[bench] building kubectl v{K8S_VERSION} into {built.parent}", file=sys.stderr)
            done = subprocess.run(
                ["bash", str(BUILD_SCRIPT), str(built.parent)],
                env={**environ, "CAP_K8S_VERSION": K8S_VERSION},
                check=False,
            )
            if done.returncode != 0 or not os.access(built, os.X_OK):
                raise KubectlError(
                    "building kubectl with Go failed (see above); install kubectl on PATH "
                    "or set CAP_BENCH_KUBECTL to one"
                )
    return built


def kubectl_loop(
    kubectl: Path,
    targets: Sequence[tuple[str, str, str]],
    *,
    cert_file: Path,
    key_file: Path,
    workdir: Path,
) -> float:
    """Run the shell loop over (kubeconfig path, namespace, name) targets; return seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{kubeconfig} {namespace} {name}\n" for kubeconfig, namespace, name in targets)
    env = {
        **os.environ,
        "KUBECTL": str(kubectl),
        "CERT": str(cert_file),
        "KEY": str(key_file),
        # A home of its own: the discovery cache warms up on the first target, as it
        # would on an operator's laptop, and never touches the real ~/.kube.
        "HOME": str(workdir),
    }
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", LOOP],
        input=lines,
        text=True,
        env=env,
        capture_output=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise KubectlError(f"the kubectl loop failed: {done.stderr.strip()[-2000:]}")
    return elapsed
