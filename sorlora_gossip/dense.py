"""Dense LoRA payloads: the DFL-LoRA baseline's exchange (A and B in full), the anchor SO-LoRA is compared with.

:class:`DenseUpdate` mirrors :class:`peft_sorlora.SparseUpdate`'s interface (``round``, ``has_structure``,
``to_bytes``/``from_bytes`` with the same validation), so a :class:`sorlora_gossip.Peer` moves either kind.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from peft_sorlora import PayloadError
from peft_sorlora.exchange import UpdateStats, canonical_safetensors, check_payload_header, check_values, header_bound

__all__ = ["DENSE_FORMAT", "DenseUpdate"]

DENSE_FORMAT = "lora-dense-update/1"
# what get_peft_model_state_dict returns for a LoRA adapter: <module path>.lora_A.weight / .lora_B.weight, nothing
# else (a key naming a base weight would overwrite the frozen base model shared by every peer)
_LORA_KEY = re.compile(r"(?P<module>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.lora_(?P<kind>[AB])(?:\.weight)?")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_lora_tensors(values: dict[str, torch.Tensor]) -> None:
    """Refuse keys that are not LoRA A/B weights, unpaired or mis-shaped A/B, non-float, NaN/Inf, out of bounds."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in values.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None or "base_layer" in key.split("."):
            raise PayloadError(f"payload holds {key!r}, which is not a LoRA A/B weight")
        if tensor.dtype not in _FLOAT_DTYPES or tensor.ndim != 2:
            raise PayloadError(f"{key!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, expected a 2-D float")
        check_values(key, tensor)
        modules.setdefault(match["module"], {})[match["kind"]] = tensor
    for module, pair in modules.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            shapes = {k: tuple(v.shape) for k, v in pair.items()}
            raise PayloadError(f"LoRA weights of {module!r} do not pair up (A is r x in, B is out x r): {shapes}")


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

    @property
    def structure(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape: what every later payload of a peer (and of its neighbours, same config) must hold."""
        return {k: tuple(v.shape) for k, v in sorted(self.values.items())}

    layout = structure

    def max_bytes(self, *, structure: bool) -> int:
        """The most bytes a compatible dense payload may take (same keys and shapes, float32 at most)."""
        return header_bound(len(self.values)) + 4 * self.num_values

    def fingerprint(self) -> str:
        """SHA-256 of the payload's bytes."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def stats(self) -> UpdateStats:
        """What the payload costs: every A and B entry is updated and transmitted."""
        value_bytes = sum(int(v.numel()) * v.element_size() for v in self.values.values())
        return UpdateStats(params_updated=self.num_values, params_transmitted=self.num_values,
                           bytes=len(self.to_bytes()), value_bytes=value_bytes)  # fmt: skip

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
        masks: dict[str, tuple[int, ...]] | None = None,
    ) -> DenseUpdate:
        """Parse and validate by the same rules as sparse payloads (format, integer round, base model, config hash,
        only LoRA A/B weights that pair up, NaN/Inf and value bounds); ``masks``: the :attr:`structure` the
        payload must match exactly (keys and shapes), e.g. the receiver's own. Raise :class:`PayloadError`."""
        metadata = check_payload_header(
            data,
            format=DENSE_FORMAT,
            required=("round",),
            expected_base_model=expected_base_model,
            expected_config_hash=expected_config_hash,
            integers=("round",),
        )
        try:
            values = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise PayloadError(f"payload is not valid safetensors: {exc}") from exc
        _check_lora_tensors(values)
        update = cls(values=dict(sorted(values.items())), metadata={k: v for k, v in metadata.items() if k != "format"})
        if masks is not None and update.structure != dict(masks):
            differ = sorted(set(update.structure.items()) ^ set(dict(masks).items()))[:3]
            raise PayloadError(f"payload tensors differ from the expected LoRA structure: {differ}")
        return update
