"""Centroids for the ``sequence`` router: what each member computes on its own data and ships with its expert.

A member runs its own tokenized prompts through the **bare base model** (no adapter), mean-pools over the real
(attention-masked) positions the hidden state the router pools at inference (the input embeddings in the
collaboration protocol, :data:`PROTOCOL_POOL`; the router's own default is the first expert layer's input),
L2-normalises each pooled vector (the router compares directions: cosine) and
summarises them with ``k`` centroids (spherical k-means in torch, k-means++ seeding, deterministic for a seed).

**What the centroids reveal.** They are statistics, not data: ``k`` (at most 4 by default) averages of many
prompts' pooled hidden states. They reveal the topic/format of the member's prompts in the base model's
representation (enough to tell tasks apart, which is their purpose) and, for a cluster with few prompts, can sit
close to single prompts' representations. They hold no token ids, but pooled from the embeddings (or the first
layer's input) they are averages of per-token vectors, a weighted bag of words, from which matching pursuit can
recover which tokens were frequent (as it does from
the task statistics, :mod:`sorlora.study.leakage`); the prompt mean (:func:`prompt_mean`) is one more such average.
A member who wants a formal guarantee adds Gaussian noise (``epsilon``: the Gaussian mechanism after clipping each
vector's norm).

This module imports torch and the Gaussian mechanism of :mod:`moe_router.privacy`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .privacy import DEFAULT_DELTA, clip_rows, gaussian_sigma, private_mean
from .routers import EMBEDDINGS

__all__ = [
    "pooled_hidden_states",
    "kmeans",
    "prompt_mean",
    "PromptSummary",
    "summarize_prompts",
    "sequence_centroids",
    "first_layer",
    "gaussian_sigma",
    "add_gaussian_noise",
    "MAX_CENTROIDS",
    "PROTOCOL_POOL",
    "pool_width",
]

MAX_CENTROIDS = 4  # the default (and suggested maximum) number of centroids per member
# What the collaboration protocol pools (the members' centroids and prompt signatures, the published MoE's
# ``sequence`` router): the input embeddings. On the study's four tasks (five seeds, the bundled SmolLM2-135M) the
# mean token embedding picked the right cluster for 97.5-100% of every task's test prompts, against 83-100% for
# the first expert layer's input, whose normalised, position-mixed states blur two film-review tasks.
PROTOCOL_POOL = EMBEDDINGS


def first_layer(base_model: nn.Module, layer_keys: Iterable[str]) -> str:
    """The first of ``layer_keys`` in ``base_model``'s module order: the ``sequence`` router's default pooling layer
    (the expert layer the MoE pools at inference when ``pool_layer`` is not set)."""
    keys = set(layer_keys)
    for name, _ in base_model.named_modules():
        if name in keys:
            return name
    raise ValueError(f"none of the layers {sorted(keys)[:5]} exists in the base model")


def pool_width(model: nn.Module, pool_layer: str) -> int:
    """The width of what ``pool_layer`` pools on ``model``: the embedding size for ``"embeddings"``, else the input
    features of the module of that name (a Linear's ``in_features``, or the first dimension of a GPT-2 Conv1D's
    weight)."""
    if pool_layer == EMBEDDINGS:
        return int(model.get_input_embeddings().embedding_dim)
    modules = dict(model.named_modules())
    if pool_layer not in modules:
        raise ValueError(f"pool_layer {pool_layer!r} is not a module of the model (nor {EMBEDDINGS!r})")
    layer = modules[pool_layer]
    return int(getattr(layer, "in_features", None) or layer.weight.shape[0])


def _batches(batches: Any) -> list[Mapping[str, torch.Tensor]]:
    items = [batches] if isinstance(batches, Mapping) else list(batches)
    if not items or any(not isinstance(b, Mapping) or "input_ids" not in b for b in items):
        raise ValueError("batches must be one or more dicts with input_ids (and optionally attention_mask)")
    return items


@torch.no_grad()
def pooled_hidden_states(base_model: nn.Module, batches: Any, pool_layer: str) -> torch.Tensor:
    """One mean-pooled vector per sequence (n, d) of ``batches`` on ``base_model``: the input of module
    ``pool_layer`` (a layer key), or the input embeddings for ``"embeddings"``, averaged over the positions where
    ``attention_mask`` is 1. An implicit-MoE model is run without its experts (its bare base)."""
    unwrapped = getattr(base_model, "unwrapped", None)
    if callable(unwrapped) and hasattr(base_model, "expert_layers"):
        with unwrapped() as bare:
            return pooled_hidden_states(bare, batches, pool_layer)
    if pool_layer == EMBEDDINGS:
        module = base_model.get_input_embeddings()
    else:
        modules = dict(base_model.named_modules())
        if pool_layer not in modules:
            raise ValueError(f"pool_layer {pool_layer!r} is not a module of the base model (nor {EMBEDDINGS!r})")
        module = modules[pool_layer]
    captured: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.append((output if pool_layer == EMBEDDINGS else args[0]).detach().float())

    handle = module.register_forward_hook(hook)
    was_training = base_model.training
    base_model.eval()
    pooled = []
    try:
        for batch in _batches(batches):
            captured.clear()
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            if pool_layer == EMBEDDINGS:
                module(inputs["input_ids"])
            else:
                base_model(**inputs)
            x = captured[0]
            mask = inputs.get("attention_mask")
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
                w = mask.to(x.device).float().unsqueeze(-1)
                pooled.append(((x * w).sum(1) / w.sum(1).clamp_min(1.0)).cpu())
            else:
                pooled.append(x.mean(1).cpu())
    finally:
        handle.remove()
        base_model.train(was_training)
    return torch.cat(pooled)


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of ``points`` (n, d): ``(centroids (min(k, n), d) of unit norm, assignment (n,))``.

    Points are L2-normalised, seeded by k-means++ with a ``torch.Generator`` seeded by ``seed`` and refined by
    cosine assignment / mean-and-renormalise updates until the assignment is stable: deterministic for a seed.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (n, d) tensor, got {tuple(points.shape)}")
    x = F.normalize(points.detach().double(), dim=-1)
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(int(seed))
    chosen = [int(torch.randint(n, (1,), generator=g))]
    for _ in range(1, k):
        dist = (1.0 - x @ x[chosen].T).clamp_min(0).amin(1)
        if float(dist.sum()) <= 0:
            remaining = [i for i in range(n) if i not in chosen]
            chosen.append(remaining[int(torch.randint(len(remaining), (1,), generator=g))])
        else:
            chosen.append(int(torch.multinomial(dist, 1, generator=g)))
    centroids = x[chosen].clone()
    assignment = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = (x @ centroids.T).argmax(1)
        if torch.equal(new, assignment):
            break
        assignment = new
        for c in range(k):
            members = x[assignment == c]
            if members.shape[0]:
                centroids[c] = F.normalize(members.mean(0), dim=0)
    return centroids.float(), assignment


def prompt_mean(
    points: torch.Tensor,
    *,
    epsilon: float | None = None,
    delta: float = DEFAULT_DELTA,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The mean (d,) of a member's L2-normalised pooled prompt vectors ``points`` (n, d): its task's signature, from
    which the cluster topology tells tasks apart (:func:`sorlora_gossip.topology.signature_distances`).

    One number more than the centroids reveal: where the member's prompts lie on average, and (through its norm,
    ``1 - spread``) how alike they are. With ``epsilon``: :func:`~moe_router.privacy.private_mean` with clip norm 1
    (a no-op on unit vectors), noise ``N(0, σ² I)`` with ``σ = gaussian_sigma(epsilon, delta, 2 / n)``."""
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (n, d) tensor, got {tuple(points.shape)}")
    x = F.normalize(points.detach().float(), dim=-1)
    if epsilon is None:
        return x.mean(0)
    return private_mean(x, epsilon, 1.0, delta=delta, generator=generator)


@dataclass(frozen=True)
class PromptSummary:
    """What a member registers about its prompts (:func:`summarize_prompts`): the ``sequence`` router's
    ``centroids`` (k, d), the ``mean`` (d,) of the same unit pooled vectors (the cluster topology's task signature)
    and the number of ``prompts`` they summarise."""

    centroids: torch.Tensor
    mean: torch.Tensor
    prompts: int


def summarize_prompts(
    base_model: nn.Module,
    batches: Any,
    *,
    pool_layer: str,
    k: int = MAX_CENTROIDS,
    seed: int = 0,
    epsilon: float | None = None,
    delta: float = DEFAULT_DELTA,
    generator: torch.Generator | None = None,
) -> PromptSummary:
    """A member's :class:`PromptSummary` from its tokenized ``batches`` on the bare ``base_model``.

    ``pool_layer``: the layer key the MoE pools (its first expert layer: :func:`first_layer`, or what
    ``router_options["sequence"]["pool_layer"]`` names) or ``"embeddings"``. Each pooled vector is L2-normalised
    (so its norm is 1, which is also the clipping norm for the noise), then :func:`kmeans` with ``seed`` gives the
    centroids and :func:`prompt_mean` the mean. ``epsilon`` (optional): Gaussian noise on both, each its own
    release (:func:`add_gaussian_noise` with ``clip_norm=1``, and :func:`prompt_mean`'s), ``delta`` each.
    """
    points = F.normalize(pooled_hidden_states(base_model, batches, pool_layer), dim=-1)
    centroids, _ = kmeans(points, k, seed=seed)
    if epsilon is not None:
        centroids = add_gaussian_noise(centroids, epsilon, delta, 1.0, generator=generator)
    mean = prompt_mean(points, epsilon=epsilon, delta=delta, generator=generator)
    return PromptSummary(centroids=centroids, mean=mean, prompts=int(points.shape[0]))


def sequence_centroids(base_model: nn.Module, batches: Any, **kwargs: Any) -> torch.Tensor:
    """A member's centroids (min(k, sequences), d) for the ``sequence`` router: :func:`summarize_prompts`'s
    ``centroids`` (same keyword arguments)."""
    return summarize_prompts(base_model, batches, **kwargs).centroids


def add_gaussian_noise(
    centroids: torch.Tensor,
    epsilon: float,
    delta: float,
    clip_norm: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``clip(c) + N(0, σ² I)`` for every centroid (row) ``c``, with ``σ = gaussian_sigma(epsilon, delta, clip_norm)``.

    Each row's L2 norm is first clipped to ``clip_norm`` (a no-op for centroids of unit-norm pooled vectors with
    ``clip_norm >= 1``). What the guarantee covers: one release of a vector whose L2 sensitivity is ``clip_norm`` gets
    (ε, δ)-DP; the mean of ``n >= 2`` clipped pooled vectors (``k = 1``) has sensitivity ``2·clip_norm/n <=
    clip_norm``, so it is covered. With ``k > 1`` the k-means assignment itself depends on the data, so the noise is
    a heuristic protection, not a proof; each released set of centroids spends its own (ε, δ).
    """
    sigma = gaussian_sigma(epsilon, delta, clip_norm)  # the one Gaussian mechanism: moe_router/privacy.py
    c = clip_rows(centroids, clip_norm)
    noise = torch.randn(c.shape, generator=generator, dtype=c.dtype) * sigma
    return c + noise
