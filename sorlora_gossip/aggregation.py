"""How received updates are combined (Sec. IV-C, Eq. 9-10): masked averaging of sparse B inside a cluster, dense
LoRA FedAvg for the baseline, and the inter-cluster exchange that keeps one expert per cluster without averaging.

Plain functions over tensors, state dicts and ``peft_sorlora.SparseUpdate`` objects: no model, no training loop,
no hub. Sparse values are 1-D tensors in the row-major order of ``mask.nonzero()`` (as in ``SparseUpdate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import networkx as nx
import torch

from sorlora_gossip.topology import clusters

if TYPE_CHECKING:
    from peft_sorlora import SparseUpdate

__all__ = [
    "masked_average",
    "fedavg",
    "restrict_to_mask",
    "masked_average_updates",
    "member_views",
    "cluster_experts",
]


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Positive finite weights, one per member (equal weights when None), scaled so that the largest is 1."""
    if count == 0:
        raise ValueError("need at least one member to aggregate")
    if weights is None:
        return [1.0] * count
    w = [float(x) for x in weights]
    if len(w) != count:
        raise ValueError(f"got {len(w)} weights for {count} members")
    if not all(x > 0 and x != float("inf") for x in w):
        raise ValueError(f"weights (data sizes) must be positive and finite, got {w}")
    top = max(w)
    return [x / top for x in w]  # scale-free; keeps float32 weight sums from overflowing


def _promoted_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The floating dtype (at least float32) that all the given tensors promote to."""
    out = torch.float32
    for x in tensors:
        out = torch.promote_types(out, x.dtype)
    return out


def _dense(layer: str, update: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A member's B on one layer as a dense tensor with zeros outside its mask (from dense or 1-D sparse values)."""
    if update.dim() == 1:
        nnz = int(mask.sum())
        if update.numel() != nnz:
            raise ValueError(f"layer {layer!r}: {update.numel()} sparse values for a mask with {nnz} entries")
        dense = torch.zeros(mask.shape, dtype=update.dtype, device=update.device)
        dense[mask] = update
        return dense
    if update.shape != mask.shape:
        raise ValueError(f"layer {layer!r}: update shape {tuple(update.shape)} != mask shape {tuple(mask.shape)}")
    return torch.where(mask, update, torch.zeros((), dtype=update.dtype, device=update.device))


def masked_average(
    updates: Sequence[Mapping[str, torch.Tensor]],
    masks: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The cluster's shared B̄ per layer: each entry is the weighted mean over the members whose mask holds it.

    ``updates[j][layer]`` is member j's B, dense (out, r) (entries outside its mask are ignored) or the 1-D masked
    values; ``masks[j][layer]`` its bool mask; ``weights`` the data sizes (equal when None). Entries no member holds
    are 0. Each member's coefficient ``w_j / sum of w over holders`` is formed first, so an entry held by one member
    is copied exactly (coefficient 1.0): with disjoint masks B̄ is exactly the sum of the members' masked parts.
    """
    w = _check_weights(weights, len(updates))
    if len(masks) != len(updates):
        raise ValueError(f"got {len(masks)} masks for {len(updates)} updates")
    layers = list(masks[0])
    for j, (u, m) in enumerate(zip(updates, masks)):
        if set(m) != set(layers) or set(u) != set(layers):
            raise ValueError(f"member {j} has layers {sorted(u)} / masks {sorted(m)}, expected {sorted(layers)}")
    result: dict[str, torch.Tensor] = {}
    for layer in layers:
        shape = masks[0][layer].shape
        member_masks = []
        for j, m in enumerate(masks):
            mask = m[layer]
            if mask.dtype != torch.bool or mask.shape != shape:
                raise ValueError(f"layer {layer!r}: mask of member {j} must be bool {tuple(shape)}")
            member_masks.append(mask)
        dtype = _promoted_dtype([u[layer] for u in updates])
        dense = [_dense(layer, updates[j][layer], member_masks[j]).to(dtype) for j in range(len(updates))]
        if not all(torch.isfinite(d).all() for d in dense):
            raise ValueError(f"layer {layer!r}: updates contain NaN or Inf")
        # Weights in the computation dtype, so an entry held by one member gets coefficient w_j / w_j == 1 exactly.
        wts = [torch.tensor(wj, dtype=dtype) for wj in w]
        zero = torch.zeros((), dtype=dtype)
        holders = sum(torch.where(mj, wj, zero) for wj, mj in zip(wts, member_masks))
        safe = torch.where(holders > 0, holders, torch.ones((), dtype=dtype))
        total = torch.zeros(shape, dtype=dtype, device=dense[0].device)
        for wj, mj, dj in zip(wts, member_masks, dense):
            total = total + torch.where(mj, wj / safe, zero) * dj
        result[layer] = total
    return result


def fedavg(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Dense LoRA FedAvg (Eq. 9-10, the DFL-LoRA baseline): the weighted mean of every tensor (A and B alike).

    All state dicts must have the same keys and shapes; ``weights`` are data sizes (equal when None).
    """
    w = _check_weights(weights, len(state_dicts))
    keys = list(state_dicts[0])
    total_w = sum(w)
    result: dict[str, torch.Tensor] = {}
    for j, sd in enumerate(state_dicts):
        if set(sd) != set(keys):
            raise ValueError(f"state dict {j} has keys {sorted(set(sd) ^ set(keys))} not shared by state dict 0")
    for key in keys:
        shape = state_dicts[0][key].shape
        dtype = _promoted_dtype([sd[key] for sd in state_dicts])
        acc = torch.zeros(shape, dtype=dtype, device=state_dicts[0][key].device)
        for wj, sd in zip(w, state_dicts):
            if sd[key].shape != shape:
                raise ValueError(f"{key!r}: shape {tuple(sd[key].shape)} != {tuple(shape)}")
            acc = acc + (wj / total_w) * sd[key].to(dtype)
        result[key] = acc
    return result


def restrict_to_mask(b: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 1-D values of dense B at each layer's mask (row-major order of ``mask.nonzero()``), as a peer sends them."""
    missing = set(masks) - set(b)
    if missing:
        raise ValueError(f"B lacks layers {sorted(missing)}")
    return {layer: b[layer][mask].contiguous() for layer, mask in masks.items()}


def _structure(update: SparseUpdate, stored: SparseUpdate | None, who: Hashable) -> SparseUpdate:
    """The update that carries a member's masks and shapes: its own, or the round-0 one stored by the receiver."""
    if update.has_structure:
        return update
    if stored is None or not stored.has_structure:
        raise ValueError(f"update of {who!r} carries no masks; pass its round-0 update (with structure)")
    return stored


def masked_average_updates(
    updates: Sequence[SparseUpdate],
    weights: Sequence[float] | None = None,
    *,
    structure: Sequence[SparseUpdate | None] | None = None,
) -> dict[str, torch.Tensor]:
    """``masked_average`` over members' ``SparseUpdate``s: the cluster's dense B̄ per layer.

    Value-only updates (rounds > 0) need the member's round-0 update (with masks) at the same index of ``structure``.
    """
    stored = list(structure) if structure is not None else [None] * len(updates)
    if len(stored) != len(updates):
        raise ValueError(f"got {len(stored)} structure entries for {len(updates)} updates")
    masks = [_structure(u, s, j).masks for j, (u, s) in enumerate(zip(updates, stored))]
    return masked_average([u.values for u in updates], masks, weights)


def member_views(
    b_bar: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    *,
    structure: Sequence[SparseUpdate | None] | None = None,
    exclusive: bool = False,
) -> list[SparseUpdate]:
    """Each member's part of the shared B̄: a ``SparseUpdate`` with the member's structure and B̄ on its own mask.

    Metadata (base model, projection seed/slot, config hash, ...) is the member's, so a receiver rebuilds its A.
    ``exclusive``: an entry of B̄ goes to the first member (in the given order) whose mask holds it and is 0 in the
    later members' parts. With one projection A shared by every member (LoRI) the parts then sum to B̄ on the union
    of the masks, each entry counted once; with per-member A (SO-LoRA) every holder carries it (the default).
    """
    stored = list(structure) if structure is not None else [None] * len(updates)
    views = []
    covered: dict[str, torch.Tensor] = {}
    for j, (u, s) in enumerate(zip(updates, stored)):
        src = _structure(u, s, j)
        source = dict(b_bar)
        if exclusive:
            for layer, mask in src.masks.items():
                if layer in covered:
                    source[layer] = torch.where(covered[layer], torch.zeros((), dtype=b_bar[layer].dtype), b_bar[layer])
                    covered[layer] = covered[layer] | mask
                else:
                    covered[layer] = mask.clone()
        values = {layer: v.to(u.values[layer].dtype) for layer, v in restrict_to_mask(source, src.masks).items()}
        views.append(dataclasses.replace(u, values=values, masks=src.masks, shapes=src.shapes))
    return views


def cluster_experts(
    g: nx.Graph,
    updates: Mapping[Hashable, SparseUpdate],
    weights: Mapping[Hashable, float] | None = None,
    *,
    structure: Mapping[Hashable, SparseUpdate] | None = None,
) -> dict[int, list[SparseUpdate]]:
    """Inter-cluster exchange without averaging: one expert per cluster of ``g``, keyed by cluster id.

    An expert is its members' ``SparseUpdate``s (sorted by peer), each carrying the member's structure and the
    cluster's masked average B̄ on the member's own mask, so Σ_j (B̄ ⊙ M_j) A_j rebuilds the cluster's update.
    Every peer stores all experts; experts of different clusters are never averaged together.
    """
    experts: dict[int, list[SparseUpdate]] = {}
    groups = clusters(g)
    ids = sorted({c for _, c in g.nodes(data="cluster")})
    for c, members in zip(ids, groups):
        order = sorted(members)
        missing = [v for v in order if v not in updates]
        if missing:
            raise ValueError(f"cluster {c}: no update from peers {missing}")
        ups = [updates[v] for v in order]
        w = None if weights is None else [weights[v] for v in order]
        stored = None if structure is None else [structure.get(v) for v in order]
        b_bar = masked_average_updates(ups, w, structure=stored)
        experts[c] = member_views(b_bar, ups, structure=stored)
    return experts
