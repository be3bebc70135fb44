"""Calibration: observing a few batches, then freezing the sparse masks of an adapter (see :mod:`peft_sorlora.masks`).

Masks are chosen automatically by the layers themselves during the first ``mask_calibration_steps`` training
batches, on every forward path (``PeftModel`` with or without ``task_type``, ``transformers.Trainer``, accelerate,
a plain loop): see :class:`peft_sorlora.layer.MaskCalibration`. :func:`calibrate` does it up front on given batches
instead, without an optimizer step being spent on observation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .layer import SOLoRALayer
from .masks import allocate_budget, freeze_masks, spectral_entropy

__all__ = [
    "calibrate",
    "finalize_masks",
    "spectral_entropy",
    "allocate_budget",
    "solora_layers",
    "pending_adapters",
    "trainable_entries",
]


def solora_layers(model: nn.Module, adapter_name: str) -> list[SOLoRALayer]:
    """The SO-LoRA layers of ``model`` that carry ``adapter_name``, in module order.

    The walk does not descend into SO-LoRA layers (they hold per-adapter dropouts, one per adapter), so its cost
    does not grow with the number of adapters a model holds (100 peers in one process).
    """
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, SOLoRALayer):
            if adapter_name in module.solora_B:
                found.append(module)
            continue
        stack.extend(reversed(list(module.children())))
    return found


def pending_adapters(model: nn.Module) -> set[str]:
    """Adapters whose masks are not frozen yet (still observing)."""
    return {name for m in model.modules() if isinstance(m, SOLoRALayer) for name in m.observations}


def finalize_masks(model: nn.Module, adapter_name: str, config: Any) -> dict[str, float]:
    """Freeze the masks of ``adapter_name`` from what was observed; record per-layer sparsity in ``config``."""
    layers = solora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"no SO-LoRA layer carries adapter {adapter_name!r}")
    return freeze_masks(layers, adapter_name, config)


def trainable_entries(model: nn.Module, adapter_name: str | None = None) -> tuple[int, int]:
    """``(entries of B that train, all entries of B)`` of an adapter: what ``print_trainable_parameters`` over-counts.

    PEFT counts every entry of the trainable ``solora_B`` parameters; only the masked ones ever move. Before the
    masks freeze, the first number is the budget the masks will keep (``sparsity`` of all entries).
    """
    configs = getattr(model, "peft_config", None) or {}
    name = adapter_name or getattr(model, "active_adapter", None) or next(iter(configs), None)
    if isinstance(name, list):
        name = name[0]
    layers = solora_layers(model, name) if name is not None else []
    if not layers:
        raise ValueError(f"no SO-LoRA layer carries adapter {name!r}")
    total = sum(layer.out_features * layer.r[name] for layer in layers)
    if any(name in layer.observations for layer in layers):
        sizes = {layer.layer_key: layer.out_features * layer.r[name] for layer in layers}
        return sum(allocate_budget(sizes, configs[name].sparsity).values()), total
    return sum(int(layer.solora_mask[name].sum()) for layer in layers), total


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    adapter_name: str | None = None,
    loss_fn: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Observe up to ``mask_calibration_steps`` (or ``max_steps``) batches, then freeze the adapter's masks; returns ``s_l``.

    Each batch is passed as ``model(**batch)``; the loss is ``outputs.loss`` (give ``labels``) or ``loss_fn(outputs,
    batch)``. B does not move during calibration (its gradient is recorded, then zeroed). Dropout is off while
    observing so the masks are reproducible. The chosen fractions are written to ``config.layer_sparsity`` so that
    a saved adapter reloads with the same masks.
    """
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        raise ValueError("calibrate expects a model with SO-LoRA adapters (from peft.get_peft_model)")
    name = adapter_name or getattr(model, "active_adapter", None) or next(iter(peft_config))
    if isinstance(name, list):
        name = name[0]
    config = peft_config[name]
    layers = solora_layers(model, name)
    if not layers:
        raise ValueError(f"no SO-LoRA layer carries adapter {name!r}")
    if all(name not in layer.observations for layer in layers):
        raise ValueError(f"the masks of adapter {name!r} are already frozen (layer_sparsity is set)")
    steps = max_steps or config.mask_calibration_steps
    was_training = model.training
    requires = [layer.solora_B[name].requires_grad for layer in layers]
    for layer in layers:  # an inactive adapter is frozen; observing needs its gradient (B itself does not move)
        layer.solora_B[name].requires_grad_(True)
    groups = {id(g): g for g in (layer.observations[name].group for layer in layers if name in layer.observations)}
    for group in groups.values():  # this loop decides when the masks freeze, not the layers' automatic calibration
        group.auto = False
    model.eval()
    seen = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                outputs = model(**batch)
                loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
                if loss is None:
                    raise ValueError("calibration batches need `labels` (so outputs.loss is set) or a loss_fn")
                loss.backward()
                seen += 1
                if seen >= steps:
                    break
    finally:
        model.train(was_training)
        for group in groups.values():
            group.auto = True
        for layer, flag in zip(layers, requires):
            layer.solora_B[name].requires_grad_(flag)
    if seen == 0:
        raise ValueError("calibrate needs at least one batch")
    # one group (the tuner's) freezes all layers and pools the observations of several processes first
    (group,) = groups.values() if len(groups) == 1 else (None,)
    fractions = (
        group.freeze()
        if group is not None and len(group.layers) == len(layers)
        else finalize_masks(model, name, config)
    )
    for layer in layers:
        if layer.solora_B[name].grad is not None:
            layer.solora_B[name].grad = None
    return fractions
