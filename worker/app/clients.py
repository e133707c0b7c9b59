"""The Kubernetes client for a target: the one place runs and health checks get it from.

API clients live in the process's :class:`~worker.kube.connect.ClientCache`, one per
credential, keyed by a hash of the sealed kubeconfig: while the stored credential is
unchanged the cached client is used without decrypting anything; a rotated credential has
other sealed bytes, so its client is rebuilt.
"""

from __future__ import annotations

from models import queries
from models.entities import Target
from models.enums import ConnectionMode
from worker.app.metrics import kube_retry
from worker.kube.client import KubeClient, RetryPolicy
from worker.platform.runtime import Runtime

__all__ = ["kube_client"]


def kube_client(
    rt: Runtime, target: Target, *, sealed_credential: bytes | None = None
) -> KubeClient:
    """A client for the target's cluster; ``sealed_credential`` saves reading it again."""
    retry = RetryPolicy.from_settings(rt.settings.kube, on_retry=kube_retry)
    if target.connection_mode is ConnectionMode.IN_CLUSTER:
        api = rt.clients.for_in_cluster(rt.settings.kube.serviceaccount_dir, rt.environ)
        return KubeClient(api, retry=retry)
    assert target.credential_id is not None  # enforced by a check constraint
    credential_id = target.credential_id
    if sealed_credential is None:
        with rt.session() as session:
            sealed_credential = queries.get_credential(session, credential_id).secret
    sealed = sealed_credential
    api = rt.clients.for_sealed_credential(
        credential_id,
        sealed,
        allow_insecure=target.allow_insecure,
        reveal=lambda: queries.unseal_credential(rt.sealer, credential_id, sealed),
    )
    return KubeClient(api, retry=retry)
