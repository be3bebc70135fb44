"""Choosing the masks: the layer-wise sparsity budget (paper Eq. 20-22) and the top-entries selection.

Pure functions over what the layers observed (accumulated B gradients, input second moments): per layer, keep the
``n_l`` entries of B with the largest accumulated gradient magnitude, where ``Σ n_l`` is exactly the global budget
``sparsity · Σ |B_l|``. The masks never change afterwards, so receivers learn them once. Layers are duck-typed (any
object with ``solora_B``, ``observations``, ``set_mask``, ...), so this module imports no layer class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .projection import derive_seed

__all__ = ["spectral_entropy", "allocate_budget", "top_mask", "freeze_masks"]


def spectral_entropy(weight: torch.Tensor, second_moment: torch.Tensor, *, damping: float) -> float:
    """Entropy of the data-aware spectrum of one layer (Eq. 20-21).

    ``σ = svdvals(W0 C)`` with ``C = E[x xᵀ] + λ·mean(diag)·I`` built from many calibration token vectors and damped
    so it is invertible (the paper's single averaged vector gives a rank-1 C); ``p = σ / Σσ``; ``H = -Σ p log p``.
    """
    c = second_moment.double()
    c = c + damping * torch.diagonal(c).mean().clamp_min(1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    sigma = torch.linalg.svdvals(weight.double() @ c)
    p = sigma / sigma.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def allocate_budget(
    sizes: Mapping[str, int], sparsity: float, scores: Mapping[str, float] | None = None
) -> dict[str, int]:
    """Kept entries per layer: ``Σ n_l = round(sparsity · Σ size_l)`` exactly, each ``1 <= n_l <= size_l``.

    Without scores every layer keeps the same fraction. With scores (spectral entropies), a layer's share of the
    budget is proportional to ``softmax(H)_l · size_l``; a layer that would exceed its size is capped at ``s_l = 1``
    (Eq. 22 with min, not max) and the excess is spread over the others (water-filling).
    """
    keys = list(sizes)
    size = np.array([sizes[k] for k in keys], dtype=np.float64)
    total = int(round(sparsity * size.sum()))
    total = min(max(total, len(keys)), int(size.sum()))
    if scores is None:
        weight = size.copy()
    else:
        h = np.array([scores[k] for k in keys], dtype=np.float64)
        soft = np.exp(h - h.max())
        weight = soft / soft.sum() * size
    share = np.zeros_like(size)
    free = np.ones(len(keys), dtype=bool)
    remaining = float(total)
    while free.any():
        alloc = remaining * weight[free] / weight[free].sum()
        over = alloc >= size[free]
        if not over.any():
            share[free] = alloc
            break
        idx = np.flatnonzero(free)[over]
        share[idx] = size[idx]
        remaining -= size[idx].sum()
        free[idx] = False
    counts = np.clip(np.floor(share), 1, size).astype(np.int64)
    # largest remainder so that the total is met exactly
    deficit = total - int(counts.sum())
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while deficit != 0 and i < 4 * len(keys) + 4:
        for j in order:
            if deficit > 0 and counts[j] < size[j]:
                counts[j] += 1
                deficit -= 1
            elif deficit < 0 and counts[j] > 1:
                counts[j] -= 1
                deficit += 1
            if deficit == 0:
                break
        i += 1
    return {k: int(c) for k, c in zip(keys, counts)}


def top_mask(score: torch.Tensor, keep: int, seed: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest scores; ties are broken by a seeded random order (deterministic)."""
    flat = score.flatten().double().cpu()
    generator = torch.Generator().manual_seed(seed)
    tiebreak = torch.randperm(flat.numel(), generator=generator)
    shuffled = flat[tiebreak]
    order = torch.sort(shuffled, descending=True, stable=True).indices[:keep]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[tiebreak[order]] = True
    return mask.view_as(score)


def freeze_masks(layers: Sequence[Any], adapter_name: str, config: Any) -> dict[str, float]:
    """Freeze the masks of ``adapter_name`` on ``layers`` (all its SO-LoRA layers) from what they observed.

    The budget is split over the layers (uniformly or by spectral entropy), each layer keeps its entries with the
    largest accumulated gradient, and the kept fraction per layer is recorded in ``config.layer_sparsity`` (so a
    saved adapter reloads with frozen masks). Returns that mapping.
    """
    if not layers:
        raise ValueError(f"no SO-LoRA layer carries adapter {adapter_name!r}")
    sizes = {layer.layer_key: layer.out_features * layer.r[adapter_name] for layer in layers}
    scores = None
    if config.sparsity_allocation == "spectral_entropy":
        scores = {}
        for layer in layers:
            obs = layer.observations.get(adapter_name)
            if obs is None or obs.second_moment is None:
                raise ValueError(
                    f"spectral_entropy allocation needs calibration inputs for layer {layer.layer_key!r}: "
                    "run calibrate(model, batches) with at least one batch"
                )
            weight = layer.get_base_layer().weight.detach()
            if getattr(layer, "fan_in_fan_out", False):
                weight = weight.T
            scores[layer.layer_key] = spectral_entropy(
                weight, obs.second_moment / max(obs.num_tokens, 1), damping=config.covariance_damping
            )
    counts = allocate_budget(sizes, config.sparsity, scores)
    fractions: dict[str, float] = {}
    for layer in layers:
        key = layer.layer_key
        b = layer.solora_B[adapter_name].detach()
        obs = layer.observations.get(adapter_name)
        # B after SGD from its start is B0 - lr·G: rank entries by |B0 - G| (= |G| for the usual B0 = 0).
        score = b.float().cpu() if obs is None or obs.grad_sum is None else (b.float() - obs.grad_sum).cpu()
        seed = derive_seed("mask", config.projection_seed, config.slot, key)
        layer.set_mask(adapter_name, top_mask(score.abs(), counts[key], seed))
        fractions[key] = counts[key] / sizes[key]
    config.layer_sparsity = fractions
    return fractions
