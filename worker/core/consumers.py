"""Who consumes a Secret: the Pods and Ingresses of its namespace that use it (pure).

Shown in a dry-run, so an operator knows before executing who picks up the new certificate:

* Pods that mount the Secret as a volume (a ``secret`` volume, or a ``projected`` volume
  with a ``secret`` source) see the new files after the kubelet's next sync (about a minute).
* Pods that read it through environment variables (``env[].valueFrom.secretKeyRef``,
  ``envFrom[].secretRef``) or mount it with ``subPath``/``subPathExpr`` never see the change
  until they are restarted: CertAutoPilot does not restart them, a webhook distribution
  stacked after this one can (e.g. one that triggers ``kubectl rollout restart``).
* Ingresses whose ``spec.tls[].secretName`` names it: the ingress controller reloads it on
  its own schedule (see the troubleshooting table).

Listing needs ``list`` on pods and ingresses in the namespace, an opt-in Role (the Helm
chart's ``rbac.consumers.enabled``); without it the answer is "unknown", never a failure.
The listing itself is :mod:`worker.kube.consumers`; this module only reads the objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NO_LIST_PERMISSION",
    "Consumers",
    "PodUse",
    "consumers_from_dict",
    "find_consumers",
    "render_consumers",
]

#: Why consumers are unknown when the credential may not list pods or ingresses.
NO_LIST_PERMISSION = "no list permission"

_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True)
class PodUse:
    """One Pod's uses of the Secret; ``restart_needed`` when any of them never sees an update."""

    pod: str
    uses: tuple[str, ...]
    restart_needed: bool

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form."""
        return {"pod": self.pod, "uses": list(self.uses), "restart_needed": self.restart_needed}


@dataclass(frozen=True)
class Consumers:
    """The Pods and Ingresses using a Secret; a part not listed says why (``*_unknown``)."""

    pods: tuple[PodUse, ...] = ()
    ingresses: tuple[str, ...] = ()
    pods_unknown: str | None = None
    ingresses_unknown: str | None = None

    @classmethod
    def unknown(cls, reason: str) -> Consumers:
        """Nothing could be listed, for ``reason`` (e.g. :data:`NO_LIST_PERMISSION`)."""
        return cls(pods_unknown=reason, ingresses_unknown=reason)

    @property
    def restart_needed(self) -> tuple[PodUse, ...]:
        """The Pods that keep the old certificate until restarted."""
        return tuple(use for use in self.pods if use.restart_needed)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form (names only: nothing of the Secret's content)."""
        return {
            "pods": [use.to_dict() for use in self.pods],
            "ingresses": list(self.ingresses),
            "pods_unknown": self.pods_unknown,
            "ingresses_unknown": self.ingresses_unknown,
        }


def consumers_from_dict(data: Mapping[str, Any]) -> Consumers:
    """Rebuild :class:`Consumers` from its stored ``to_dict()`` form."""
    return Consumers(
        pods=tuple(
            PodUse(str(item["pod"]), tuple(item.get("uses") or ()), bool(item["restart_needed"]))
            for item in data.get("pods") or ()
        ),
        ingresses=tuple(str(name) for name in data.get("ingresses") or ()),
        pods_unknown=data.get("pods_unknown"),
        ingresses_unknown=data.get("ingresses_unknown"),
    )


def _items(value: Any) -> list[Mapping[str, Any]]:
    # Objects come from the API server, but stay defensive: a missing or odd field is "none".
    return [item for item in value or () if isinstance(item, Mapping)]


def _secret_volumes(spec: Mapping[str, Any], secret: str) -> set[str]:
    names = set()
    for volume in _items(spec.get("volumes")):
        if (volume.get("secret") or {}).get("secretName") == secret:
            names.add(str(volume.get("name")))
        for source in _items((volume.get("projected") or {}).get("sources")):
            if (source.get("secret") or {}).get("name") == secret:
                names.add(str(volume.get("name")))
    return names


def _pod_use(pod: Mapping[str, Any], secret: str) -> PodUse | None:
    spec = pod.get("spec") or {}
    volumes = _secret_volumes(spec, secret)
    uses: list[str] = []
    restart = False
    mounted: set[str] = set()
    for kind in _CONTAINER_LISTS:
        for container in _items(spec.get(kind)):
            where = f"container {container.get('name')}"
            for mount in _items(container.get("volumeMounts")):
                if mount.get("name") not in volumes:
                    continue
                mounted.add(str(mount.get("name")))
                sub_path = mount.get("subPath") or mount.get("subPathExpr")
                if sub_path:
                    restart = True
                    uses.append(f"{where}: subPath mount {mount.get('mountPath')} ({sub_path})")
                else:
                    uses.append(f"{where}: volume mount {mount.get('mountPath')}")
            for env in _items(container.get("env")):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
                if ref.get("name") == secret:
                    restart = True
                    uses.append(f"{where}: env {env.get('name')} (key {ref.get('key')})")
            for source in _items(container.get("envFrom")):
                if (source.get("secretRef") or {}).get("name") == secret:
                    restart = True
                    uses.append(f"{where}: envFrom (every key)")
    for name in sorted(volumes - mounted):
        uses.append(f"volume {name} (not mounted by any container)")
    if not uses:
        return None
    name = str((pod.get("metadata") or {}).get("name") or "")
    return PodUse(name, tuple(uses), restart)


def find_consumers(
    secret: str,
    pods: Iterable[Mapping[str, Any]] | None,
    ingresses: Iterable[Mapping[str, Any]] | None,
    *,
    pods_unknown: str | None = None,
    ingresses_unknown: str | None = None,
) -> Consumers:
    """The Pods and Ingresses (listed in the Secret's namespace) that use Secret ``secret``."""
    found = [use for pod in pods or () if (use := _pod_use(pod, secret)) is not None]
    names = []
    for ingress in ingresses or ():
        tls = _items((ingress.get("spec") or {}).get("tls"))
        if any(entry.get("secretName") == secret for entry in tls):
            names.append(str((ingress.get("metadata") or {}).get("name") or ""))
    return Consumers(
        pods=tuple(sorted(found, key=lambda use: use.pod)),
        ingresses=tuple(sorted(names)),
        pods_unknown=pods_unknown,
        ingresses_unknown=ingresses_unknown,
    )


def _names(uses: Sequence[PodUse]) -> list[str]:
    return [f"      {use.pod}: {'; '.join(use.uses)}" for use in uses]


def render_consumers(consumers: Consumers) -> list[str]:
    """The lines a dry-run prints under the diff (names only)."""
    if consumers.pods_unknown and consumers.pods_unknown == consumers.ingresses_unknown:
        return [f"  consumers unknown ({consumers.pods_unknown})"]
    lines = ["  consumers:"]
    if consumers.pods_unknown:
        lines.append(f"    pods unknown ({consumers.pods_unknown})")
    else:
        live = [use for use in consumers.pods if not use.restart_needed]
        restart = list(consumers.restart_needed)
        if not consumers.pods:
            lines.append("    no pod uses it")
        if live:
            lines.append(
                f"    {len(live)} pod(s) mount it as a volume: they see the new certificate "
                "after the kubelet's next sync (about a minute)"
            )
            lines += _names(live)
        if restart:
            lines.append(
                f"    {len(restart)} pod(s) read it through env or subPath: they will NOT see "
                "the new certificate until restarted (CertAutoPilot does not restart pods; "
                "stack a webhook distribution after this one to trigger a rollout restart)"
            )
            lines += _names(restart)
    if consumers.ingresses_unknown:
        lines.append(f"    ingresses unknown ({consumers.ingresses_unknown})")
    elif consumers.ingresses:
        lines.append(
            f"    {len(consumers.ingresses)} ingress(es) name it in tls.secretName (the "
            f"controller reloads on its own schedule): {', '.join(consumers.ingresses)}"
        )
    else:
        lines.append("    no ingress names it in tls.secretName")
    return lines
