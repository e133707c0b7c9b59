"""List who consumes a Secret: the Pods and Ingresses of its namespace (dry-run only).

Two list requests (pods, networking.k8s.io/v1 ingresses; more only past
:data:`~worker.kube.client.LIST_PAGE_SIZE` objects). They need ``list`` on pods and ingresses,
an opt-in Role beyond the spec's minimum (the Helm chart's ``rbac.consumers.enabled``): a 403
makes that part "unknown (no list permission)", and no listing error ever fails the dry-run.
What uses the Secret is decided by :mod:`worker.core.consumers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from worker.core.consumers import NO_LIST_PERMISSION, Consumers, find_consumers
from worker.kube.client import KubeClient
from worker.kube.errors import Forbidden, KubeError, NotFound

__all__ = ["list_consumers"]

log = logging.getLogger(__name__)


def _listed(
    lister: Callable[[str], list[dict[str, Any]]], namespace: str, what: str
) -> tuple[list[dict[str, Any]] | None, str | None]:
    try:
        return lister(namespace), None
    except Forbidden:
        return None, NO_LIST_PERMISSION
    except NotFound:
        return None, f"the {what} API is not served"
    except KubeError as err:
        # Consumers are advice: the dry-run's diff stands without them.
        log.warning("could not list %s in %s: %s", what, namespace, err.reason)
        return None, f"could not list {what}: {err.reason}"


def list_consumers(client: KubeClient, namespace: str, secret_name: str) -> Consumers:
    """Who uses Secret ``namespace/secret_name``; the parts that could not be listed say why."""
    pods, pods_unknown = _listed(client.list_pods, namespace, "pods")
    ingresses, ingresses_unknown = _listed(client.list_ingresses, namespace, "ingresses")
    return find_consumers(
        secret_name,
        pods,
        ingresses,
        pods_unknown=pods_unknown,
        ingresses_unknown=ingresses_unknown,
    )
