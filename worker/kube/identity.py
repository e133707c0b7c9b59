"""Which cluster an in-cluster worker is in, and the refusal to write into another one.

An in-cluster target means "the cluster this worker runs in", so which cluster that is
depends on the worker that takes the message. The identity of a cluster, as a pod sees it, is
the CA its service-account mount trusts (``ca.crt``): the client verifies the API server
against exactly that CA, so a worker that sees another CA would write to another cluster.
It needs no API call and no permission beyond the mount. Clusters that share a CA cannot be
told apart this way; a CA rotation changes the identity (re-record it with
``certautopilot targets check NAME --record-cluster``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from worker.kube.errors import InClusterUnavailable, KubeError

__all__ = [
    "WrongCluster",
    "identity_of_ca",
    "in_cluster_identity",
    "refuse_other_cluster",
    "short",
]

#: Prefix of an identity string (the scheme, so another one can be added later).
_SCHEME = "ca-sha256:"


class WrongCluster(KubeError):
    """An in-cluster target reached a worker that runs in another cluster: nothing written."""

    reason = "wrong_cluster"
    default_fix = (
        "Run this target's pool only in the target's cluster: set CAP_WORKER_POOL (the chart's "
        "`pool` value) to a pool name of its own in each cluster, and save each in-cluster "
        "target with the --pool of the cluster it means."
    )


def identity_of_ca(ca_pem: bytes) -> str:
    """``ca-sha256:<hex>`` over the DER of every certificate in the bundle (order ignored)."""
    try:
        certificates = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise InClusterUnavailable(
            "the ServiceAccount CA certificate is not PEM; the cluster cannot be identified"
        ) from None
    digests = sorted(
        hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() for cert in certificates
    )
    return _SCHEME + hashlib.sha256("\n".join(digests).encode()).hexdigest()


def in_cluster_identity(sa_dir: Path) -> str:
    """The identity of the cluster this process runs in (from ``sa_dir/ca.crt``)."""
    ca_path = sa_dir / "ca.crt"
    try:
        ca_pem = ca_path.read_bytes()
    except OSError as exc:
        raise InClusterUnavailable(
            f"in-cluster mode is unavailable: {ca_path} cannot be read ({exc.strerror})"
        ) from None
    return identity_of_ca(ca_pem)


def refuse_other_cluster(*, target: str, pool: str, expected: str, seen: str) -> None:
    """Raise :class:`WrongCluster` unless ``seen`` is ``expected``."""
    if seen == expected:
        return
    raise WrongCluster(
        f"target {target!r} is an in-cluster target of the cluster {short(expected)}, but this "
        f"worker of pool {pool!r} runs in the cluster {short(seen)}; nothing was written",
        fix=(
            f"run pool {pool!r}'s workers only in the target's cluster (CAP_WORKER_POOL, the "
            "chart's `pool` value); if the target's cluster rotated its CA, record the new one "
            f"with `certautopilot targets check {target} --record-cluster`"
        ),
        details={"expected_cluster": expected, "seen_cluster": seen},
    )


def short(identity: str) -> str:
    """An identity as shown to operators: the scheme and 16 hex digits."""
    return identity[: len(_SCHEME) + 16]
