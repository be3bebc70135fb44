"""The one protocol every exchanged payload implements: :class:`peft_sorlora.SparseUpdate` (SO-LoRA) and
:class:`sorlora_gossip.dense.DenseUpdate` (the dense LoRA baseline), so a :class:`~sorlora_gossip.Peer` validates and
moves either by the same rules (header checks, value bounds, size caps known before the download)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from peft_sorlora.exchange import UpdateStats

__all__ = ["Payload"]


@runtime_checkable
class Payload(Protocol):
    """A peer's update for one round, as it travels (safetensors bytes with a string header)."""

    metadata: dict[str, str]

    @property
    def round(self) -> int: ...

    @property
    def has_structure(self) -> bool:
        """True for the first exchange (round 0): later payloads are checked against its :attr:`structure`."""
        ...

    @property
    def base_model(self) -> str: ...

    @property
    def config_hash(self) -> str: ...

    @property
    def num_values(self) -> int: ...

    @property
    def structure(self) -> Any:
        """What later payloads of the same peer must match (passed back to :meth:`from_bytes` as ``masks``)."""
        ...

    @property
    def layout(self) -> Any:
        """Layer shapes, equal for every peer of one configuration (None where the payload does not carry them)."""
        ...

    def max_bytes(self, *, structure: bool) -> int:
        """The most bytes a compatible payload may take (``structure``: a round-0 one), to refuse before downloading."""
        ...

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`to_bytes`."""
        ...

    def stats(self) -> UpdateStats:
        """Parameters updated/transmitted and bytes on the wire."""
        ...

    def to_bytes(self) -> bytes: ...

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        expected_base_model: str | None = None,
        expected_config_hash: str | None = None,
        masks: Any = None,
    ) -> Payload:
        """Parse and validate untrusted bytes; raise :class:`~peft_sorlora.PayloadError` saying what is wrong."""
        ...
