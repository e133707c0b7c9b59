"""The rollback snapshot: the Secret as it was before our first write, in one shape.

The Kubernetes module takes it from the live Secret and re-applies it; the database seals its
JSON form (:meth:`PreviousSecret.to_dict`) and reads it back with :meth:`PreviousSecret.from_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.core.secret import secret_manifest

__all__ = ["PreviousSecret"]


@dataclass(frozen=True)
class PreviousSecret:
    """The Secret as it was before our first write (``existed=False``: there was none)."""

    existed: bool
    type: str | None = None
    #: base64 values exactly as the API returned them (holds the old private key).
    data: dict[str, str] = field(default_factory=dict, repr=False)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    resource_version: str | None = None

    @classmethod
    def absent(cls) -> PreviousSecret:
        """Return the snapshot of "there was no Secret"."""
        return cls(existed=False)

    @classmethod
    def from_live(cls, live: Mapping[str, Any]) -> PreviousSecret:
        """Return the snapshot of a live Secret."""
        meta = live.get("metadata") or {}
        return cls(
            existed=True,
            type=str(live.get("type") or "Opaque"),
            data=dict(live.get("data") or {}),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            resource_version=meta.get("resourceVersion"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form the store seals ({existed, type, data, labels, ...})."""
        return {
            "existed": self.existed,
            "type": self.type,
            "data": dict(self.data),
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "resourceVersion": self.resource_version,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PreviousSecret:
        """Return the snapshot from :meth:`to_dict` output."""
        return cls(
            existed=bool(raw.get("existed", True)),
            type=raw.get("type"),
            data=dict(raw.get("data") or {}),
            labels=dict(raw.get("labels") or {}),
            annotations=dict(raw.get("annotations") or {}),
            resource_version=raw.get("resourceVersion"),
        )

    def manifest(self, namespace: str, name: str) -> dict[str, Any]:
        """Return the Secret manifest this snapshot describes."""
        return secret_manifest(
            name=name,
            namespace=namespace,
            secret_type=self.type or "Opaque",
            data=self.data,
            labels=self.labels,
            annotations=self.annotations,
        )
