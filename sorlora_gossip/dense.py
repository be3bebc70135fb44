"""Dense LoRA payloads: the DFL-LoRA baseline's exchange (A and B in full), the anchor SO-LoRA is compared with.

:class:`DenseUpdate` mirrors :class:`peft_sorlora.SparseUpdate`'s interface (``round``, ``has_structure``,
``to_bytes``/``from_bytes`` with the same validation), so a :class:`sorlora_gossip.Peer` moves either kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from peft_sorlora import PayloadError
from peft_sorlora.exchange import canonical_safetensors, check_payload_header

__all__ = ["DENSE_FORMAT", "DenseUpdate"]

DENSE_FORMAT = "lora-dense-update/1"


@dataclass(frozen=True)
class DenseUpdate:
    """A peer's whole LoRA adapter state dict (A and B) for one round; every payload is self-contained."""

    values: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    masks: None = None

    @property
    def round(self) -> int:
        return int(self.metadata["round"])

    @property
    def has_structure(self) -> bool:
        """Dense payloads always carry everything; round 0 counts as the structure-carrying first exchange."""
        return self.round == 0

    @property
    def base_model(self) -> str:
        return self.metadata.get("base_model", "")

    @property
    def config_hash(self) -> str:
        return self.metadata.get("config_hash", "")

    @property
    def num_values(self) -> int:
        return sum(int(v.numel()) for v in self.values.values())

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().contiguous() for k, v in self.values.items()}
        return canonical_safetensors(save_safetensors(tensors, metadata=dict(self.metadata, format=DENSE_FORMAT)))

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        expected_base_model: str | None = None,
        expected_config_hash: str | None = None,
        masks: None = None,
    ) -> DenseUpdate:
        """Parse and validate (format, base model, config hash, NaN/Inf); raise :class:`PayloadError`."""
        metadata = check_payload_header(
            data,
            format=DENSE_FORMAT,
            required=("round",),
            expected_base_model=expected_base_model,
            expected_config_hash=expected_config_hash,
        )
        try:
            values = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise PayloadError(f"payload is not valid safetensors: {exc}") from exc
        bad = [k for k, v in values.items() if not torch.isfinite(v).all()]
        if bad:
            raise PayloadError(f"values of {bad[:3]} contain NaN or Inf")
        return cls(values=dict(sorted(values.items())), metadata={k: v for k, v in metadata.items() if k != "format"})
