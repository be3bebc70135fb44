"""Real SO-LoRA sparse updates from tiny calibrated models, for the gossip tests (peft_sorlora's own API)."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model

from peft_sorlora import SOLoRAConfig, SparseUpdate, calibrate, get_sparse_update
from peft_sorlora.layer import SOLoRALayer

from .solora_models import ToyMLP

BASE_MODEL = "toy/mlp-32"


def calibrated_mlp(*, slot: int = 0, seed: int = 0, base_model: str = BASE_MODEL, r: int = 4) -> PeftModel:
    """A ToyMLP with an SO-LoRA adapter whose masks are frozen (one calibration batch)."""
    torch.manual_seed(seed)
    base = ToyMLP(32)
    base.name_or_path = base_model
    config = SOLoRAConfig(r=r, target_modules=["lin0", "lin1"], init_weights=False, sparsity=0.5, slot=slot)
    model = get_peft_model(base, config)
    batch = {"x": torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))}
    calibrate(model, [batch], loss_fn=lambda out, b: out.pow(2).mean())
    return model


def update_for_round(model: PeftModel, round: int, *, seed: int) -> SparseUpdate:
    """Give B new random values on its mask (as local training would) and take the round's sparse update."""
    g = torch.Generator().manual_seed(seed * 1000 + round)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SOLoRALayer):
                b, mask = layer.solora_B["default"], layer.solora_mask["default"]
                b.zero_()
                b[mask] = torch.randn(int(mask.sum()), generator=g)
    return get_sparse_update(model, round=round)
