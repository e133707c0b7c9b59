"""What the models need to keep secrets sealed at rest, as a protocol the caller implements.

The models never see a KEK and import no crypto: the application hands in a :class:`Sealer`
(``worker.platform.runtime.KeyringSealer`` wraps ``worker.core.crypto``). The models decide
*where* an envelope lives, and every call names that place (table, row id, purpose), which
the sealer binds into the ciphertext: an envelope copied to another row or column does not
open. The purpose is the column name.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Sealer"]


class Sealer(Protocol):
    """Seals and opens envelopes bound to (table, row id, purpose)."""

    def seal(self, plaintext: bytes, *, table: str, row_id: str, purpose: str) -> bytes:
        """Encrypt ``plaintext`` under the current key for this place."""
        ...

    def unseal(self, envelope: bytes, *, table: str, row_id: str, purpose: str) -> bytes:
        """Decrypt an envelope sealed for this place (raises if it was sealed elsewhere)."""
        ...

    def rewrap(
        self, envelope: bytes, to_key_id: str, *, table: str, row_id: str, purpose: str
    ) -> bytes:
        """The same envelope with its data key wrapped under ``to_key_id``."""
        ...

    def key_id(self, envelope: bytes) -> str:
        """The id of the key that wraps this envelope."""
        ...
