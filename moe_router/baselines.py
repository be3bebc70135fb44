"""Comparison modes for the experiment: every router (plain sum, uniform average, hard routing by task, sequence,
spectral, implicit), and PEFT's Arrow over LoRA exports (the anchor for training-free routers).

The routers are settings of the same :class:`~moe_router.ImplicitMoEForCausalLM` (no copy of the model).
For Arrow, each expert is exported as an exact PEFT LoRA adapter (``ΔW_e = Σ_c scale_c B_c a_c``, scaling 1, the same
layout ``peft.save_as_lora`` writes) and loaded with ``peft.create_arrow_model`` on a fresh base model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import ArrowConfig, LoraConfig, create_arrow_model
from safetensors.torch import save_file
from torch import nn

from .layer import ImplicitMoELinear
from .modeling import ImplicitMoEPreTrainedModel
from .routers import ROUTERS

__all__ = ["COMPARISON_MODES", "comparison_mode", "export_lora", "export_loras", "arrow_model"]

COMPARISON_MODES = {
    **{name: name for name in ROUTERS},  # every router of moe_router.routers.ROUTERS, by its name
    "task_arithmetic": "average",
    "oracle": "hard",  # the old name of hard routing by the true task (upper bound; needs expert_ids)
}


@contextlib.contextmanager
def comparison_mode(
    model: ImplicitMoEPreTrainedModel, mode: str, *, top_k: Any = None, refine: str | None = None
) -> Iterator[ImplicitMoEPreTrainedModel]:
    """Evaluate ``model`` under one comparison mode (``COMPARISON_MODES``) within the block; settings restored after.

    ``top_k`` applies to the routers that rank components (``implicit``, ``sequence``, ``spectral``; None keeps the
    model's setting); ``refine`` overrides the refinement.
    """
    if mode not in COMPARISON_MODES:
        raise ValueError(f"mode must be one of {sorted(COMPARISON_MODES)}, got {mode!r}")
    settings: dict[str, Any] = {"routing": COMPARISON_MODES[mode], "refine": refine}
    if top_k is not None:
        settings["top_k"] = top_k
    with model.router_settings(**settings):
        yield model


def _expert_delta_factors(
    model: ImplicitMoEPreTrainedModel, expert: int, refined: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer key -> (A_e ``k x in``, B_e ``out x k`` with the scale folded in) for one expert."""
    if not 0 <= expert < model.num_experts:
        raise ValueError(f"expert must be in [0, {model.num_experts - 1}], got {expert}")
    factors = {}
    for key, layer in model.expert_layers().items():
        chosen = layer.expert == expert
        a = layer.A * layer.gain[layer.member] if refined else layer.A
        factors[key] = (
            a[chosen].detach().float().cpu(),
            (layer.B[:, chosen] * layer.scale[chosen]).detach().float().cpu(),
        )
    return factors


def export_lora(
    model: ImplicitMoEPreTrainedModel,
    expert: int,
    save_directory: str | os.PathLike,
    *,
    rank: int | None = None,
    refined: bool | None = None,
) -> Path:
    """Write expert ``expert`` as an exact PEFT LoRA adapter (rank = its components, or ``rank``, zero-padded).

    ``refined`` (default: the model's current refinement) folds the task gain into ``lora_A``.
    """
    refined = model.router.refine == "task_stats" if refined is None else refined
    factors = _expert_delta_factors(model, expert, refined)
    needed = max(a.shape[0] for a, _ in factors.values())
    rank = needed if rank is None else rank
    if rank < needed or rank <= 0:
        raise ValueError(f"rank must be >= {max(needed, 1)} (the expert's components on its widest layer), got {rank}")
    tensors = {}
    for key, (a, b) in factors.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{key}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"base_model.model.{key}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(factors),
        base_model_name_or_path=model.config.base_model_name_or_path,
    )
    config.save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def export_loras(
    model: ImplicitMoEPreTrainedModel, directory: str | os.PathLike, *, refined: bool | None = None
) -> list[Path]:
    """Every expert as a LoRA adapter under ``directory/expert_<e>``, all with the same rank (what Arrow requires)."""
    rank = max(
        int((layer.expert == e).sum()) for layer in model.expert_layers().values() for e in range(model.num_experts)
    )
    return [
        export_lora(model, e, Path(directory) / f"expert_{e}", rank=rank, refined=refined)
        for e in range(model.num_experts)
    ]


def arrow_model(
    base_model: nn.Module, lora_paths: Sequence[str | os.PathLike], *, top_k: int = 1, router_temperature: float = 1.0
) -> nn.Module:
    """PEFT's Arrow (training-free routing over LoRA experts by their top singular directions) on a fresh base."""
    if isinstance(base_model, ImplicitMoEPreTrainedModel) or any(
        isinstance(m, ImplicitMoELinear) for m in base_model.modules()
    ):
        raise ValueError("arrow_model needs a plain base model, not an implicit-MoE model")
    return create_arrow_model(
        base_model,
        task_specific_adapter_paths=[str(p) for p in lora_paths],
        arrow_config=ArrowConfig(top_k=top_k, router_temperature=router_temperature),
    )
