"""The Gaussian mechanism behind every statistic a member publishes about its data (centroids, task statistics).

One mechanism, one place: clip each contribution's L2 norm to a bound fixed before seeing the data, take the mean,
add ``N(0, σ² I)`` with ``σ = Δ·sqrt(2 ln(1.25/δ))/ε`` for the mean's L2 sensitivity ``Δ``. The unit of privacy is
**one training example**: :func:`private_mean` over ``n`` per-example vectors clipped to ``C`` has sensitivity
``Δ = 2C/n`` (replacing one example moves the mean by at most that), so the released mean is (ε, δ)-differentially
private for that example (Dwork & Roth 2014, Thm. A.1; the theorem is stated for ε < 1, larger ε keep the classical
calibration without the theorem's guarantee). Everything released from one member's data spends its own (ε, δ):
the task statistics (one release, all layers together) and the centroids (one release) compose to (2ε, 2δ).

The task statistics (h0, the mean input of every adapted layer, what the implicit MoE routes on) are released with
:func:`private_statistics`: each example's mean input of every layer is concatenated into one vector, clipped to
``clip × sqrt(total width)`` (layer inputs follow an RMSNorm, so a token's input has RMS about 1 per coordinate and
``clip`` 1 rarely cuts), averaged over the examples and noised.

:func:`released_statistics` is what a member publishes: the mean input of every layer over its calibration batch's
tokens (``epsilon`` None: no noise, as before) or, with ``epsilon``, per example (row) and then
:func:`private_statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .builders import task_statistics

__all__ = [
    "DEFAULT_DELTA",
    "clip_rows",
    "gaussian_sigma",
    "private_mean",
    "private_statistics",
    "released_statistics",
]

DEFAULT_DELTA = 1e-5  # δ of every release (well below 1/n for any member's data set)


def gaussian_sigma(epsilon: float, delta: float, clip_norm: float) -> float:
    """The Gaussian mechanism's noise scale for L2 sensitivity ``clip_norm``: ``clip_norm·sqrt(2 ln(1.25/δ))/ε``.

    (Dwork & Roth 2014, Thm. A.1: (ε, δ)-differential privacy for ε in (0, 1); larger ε are accepted, the classic
    bound is then not the theorem's.)
    """
    if not (isinstance(epsilon, (int, float)) and epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
    return float(clip_norm) * math.sqrt(2.0 * math.log(1.25 / delta)) / float(epsilon)


def clip_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Every row scaled down to L2 norm at most ``clip_norm`` (rows already within it unchanged), in float32."""
    x = rows.detach().float()
    norms = x.norm(dim=-1, keepdim=True)
    return x * (float(clip_norm) / norms.clamp_min(1e-12)).clamp(max=1.0)


def private_mean(
    rows: torch.Tensor,
    epsilon: float,
    clip_norm: float,
    *,
    delta: float = DEFAULT_DELTA,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The (ε, δ)-DP mean of ``rows`` (one per example, shape ``(n, d)``): rows clipped to ``clip_norm``, averaged,
    plus Gaussian noise for the sensitivity ``2·clip_norm/n`` (one example replaced)."""
    if rows.dim() != 2 or rows.shape[0] < 1:
        raise ValueError(f"rows must be (n >= 1, d), got shape {tuple(rows.shape)}")
    n = rows.shape[0]
    sigma = gaussian_sigma(epsilon, delta, 2.0 * float(clip_norm) / n)
    mean = clip_rows(rows, clip_norm).mean(0)
    return mean + torch.randn(mean.shape, generator=generator, dtype=mean.dtype) * sigma


def private_statistics(
    per_example: Sequence[Mapping[str, torch.Tensor]],
    epsilon: float,
    *,
    clip: float = 1.0,
    delta: float = DEFAULT_DELTA,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One (ε, δ)-DP release of the mean of per-example statistics (``{layer: vector}`` per example, same layers and
    widths): the layers concatenated, clipped to ``clip × sqrt(total width)``, :func:`private_mean`, split back."""
    if not per_example:
        raise ValueError("no examples to release statistics of")
    keys = sorted(per_example[0])
    widths = [int(per_example[0][k].numel()) for k in keys]
    rows = torch.stack([torch.cat([ex[k].detach().float().reshape(-1) for k in keys]) for ex in per_example])
    if rows.shape[1] != sum(widths):
        raise ValueError("every example needs the same layers and widths")
    noised = private_mean(rows, epsilon, clip * math.sqrt(sum(widths)), delta=delta, generator=generator)
    return {k: part.reshape(per_example[0][k].shape) for k, part in zip(keys, torch.split(noised, widths))}


def released_statistics(
    base_model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layer_keys: Sequence[str],
    epsilon: float | None,
    *,
    clip: float = 1.0,
    delta: float = DEFAULT_DELTA,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The task statistics (h0 per layer) a member publishes about ``batch`` (``input_ids``, ``attention_mask``):
    without ``epsilon`` the mean over its real tokens; with it, each example's (row's) mean, then one
    (ε, δ)-DP release of their mean (:func:`private_statistics`), one example being the unit of privacy."""
    keys = list(layer_keys)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if epsilon is None:
        return {k: v.float().cpu() for k, v in task_statistics(base_model, [inputs], keys).items()}
    rows = [
        {k: v.float().cpu() for k, v in task_statistics(base_model, [{n: t[i : i + 1] for n, t in inputs.items()}],
                                                         keys).items()}
        for i in range(int(inputs["input_ids"].shape[0]))
    ]  # fmt: skip
    return private_statistics(rows, epsilon, clip=clip, delta=delta, generator=generator)
