"""The expert layer: a base Linear plus every expert's rank-1 components, routed per token with no trained router.

Each rank-1 component ``c`` of a member adapter contributes ``scale_c · B[:, c] · (a_c · x)`` where ``a_c`` is a row of
the member's frozen A. Routing (paper Eq. 29): per token, keep the ``router_top_k`` components with the largest
``|a_c · x|`` across all experts, so the frozen projections themselves act as the router. That is the ``implicit``
router; the others (``sum``, ``average``, ``hard``, ``sequence``, ``spectral``) live in :mod:`moe_router.routers`
and are reached through :attr:`RouterState.impl`.

Task-aware coding (Eq. 26), the reading implemented here: ``A_refined = A · diag(g)`` with the member's task gain
``g = |h0| / rms(h0)``, ``h0`` the mean input of the layer on the member's task data and ``rms(h0) = ‖h0‖ / sqrt(in)``.
So ``mean(g²) = 1`` (an isotropic input keeps the scale of ``A x``), a flat ``h0`` (all entries of equal magnitude)
gives ``g = 1`` and leaves A unchanged, features where the task's inputs are large are amplified and the others damped.
The sign of ``h0`` is dropped: B was trained against ``A x``, and flipping input features would scramble the update.

This module imports only torch so that it can travel to the Hub as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .routers import RouterState

__all__ = ["LayerExperts", "ImplicitMoELinear", "task_gain", "TENSOR_NAMES"]

TENSOR_NAMES = ("A", "B", "scale", "expert", "member", "gain")


def task_gain(h0: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``|h0| / rms(h0)``: the per-feature gain of task-aware coding (ones for a zero ``h0``)."""
    h0 = h0.detach().float().flatten()
    rms = h0.pow(2).mean().sqrt()
    if rms <= eps:
        return torch.ones_like(h0)
    return h0.abs() / rms


@dataclass
class LayerExperts:
    """All experts' components on one layer: the unit stored in ``experts.safetensors``.

    ``A`` (R x in) frozen projections, ``B`` (out x R) masked expansions, ``scale`` (R) the members' ``alpha / r``,
    ``expert`` (R) the expert of each component, ``member`` (R) the member (row of ``gain``), ``gain`` (G x in) each
    member's task gain (ones when it had no calibration data).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    expert: torch.Tensor
    member: torch.Tensor
    gain: torch.Tensor

    def __post_init__(self) -> None:
        r, in_features = self.A.shape
        if self.B.ndim != 2 or self.B.shape[1] != r:
            raise ValueError(f"B must be (out_features, {r}), got {tuple(self.B.shape)}")
        for name in ("scale", "expert", "member"):
            if tuple(getattr(self, name).shape) != (r,):
                raise ValueError(
                    f"{name} must have one entry per component ({r}), got {tuple(getattr(self, name).shape)}"
                )
        if self.gain.ndim != 2 or self.gain.shape[1] != in_features:
            raise ValueError(f"gain must be (members, {in_features}), got {tuple(self.gain.shape)}")
        if r and int(self.member.max()) >= self.gain.shape[0]:
            raise ValueError("member index exceeds the number of gain rows")
        for name in ("A", "B", "scale", "gain"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name} contains NaN or Inf")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(out_features, in_features, components)``."""
        return int(self.B.shape[0]), int(self.A.shape[1]), int(self.A.shape[0])

    def to_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """Flat ``{f"{key}::{name}": tensor}`` for safetensors."""
        return {f"{key}::{name}": getattr(self, name).contiguous() for name in TENSOR_NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> dict[str, LayerExperts]:
        """Inverse of :meth:`to_tensors` over a whole file: layer key -> experts."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            key, sep, kind = name.rpartition("::")
            if not sep or kind not in TENSOR_NAMES:
                raise ValueError(f"unexpected tensor {name!r} in the experts file")
            grouped.setdefault(key, {})[kind] = tensor
        out = {}
        for key, parts in grouped.items():
            missing = [n for n in TENSOR_NAMES if n not in parts]
            if missing:
                raise ValueError(f"experts file lacks {missing} for layer {key!r}")
            out[key] = cls(**{n: parts[n] for n in TENSOR_NAMES})
        return out


class ImplicitMoELinear(nn.Module):
    """``y = W0 x + B_all (scale ⊙ keep(A_refined x))``: a base Linear with every expert's components on top."""

    def __init__(self, base_layer: nn.Linear, experts: LayerExperts, router: RouterState, layer_key: str = "") -> None:
        super().__init__()
        out_features, in_features, _ = experts.shape
        if (base_layer.out_features, base_layer.in_features) != (out_features, in_features):
            raise ValueError(
                f"layer {layer_key!r}: experts are shaped for (out={out_features}, in={in_features}) but the base "
                f"layer is (out={base_layer.out_features}, in={base_layer.in_features}): experts for another base model?"
            )
        if experts.expert.numel() and int(experts.expert.max()) >= router.num_experts:
            raise ValueError(f"layer {layer_key!r}: expert index beyond the {router.num_experts} experts")
        self.base_layer = base_layer
        self.layer_key = layer_key
        self.router = router
        device = base_layer.weight.device
        self.register_buffer("A", experts.A.float().to(device))
        self.register_buffer("B", experts.B.float().to(device))
        self.register_buffer("scale", experts.scale.float().to(device))
        self.register_buffer("expert", experts.expert.long().to(device))
        self.register_buffer("member", experts.member.long().to(device))
        self.register_buffer("gain", experts.gain.float().to(device))

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def num_components(self) -> int:
        """R: rank-1 components over all experts and members."""
        return int(self.A.shape[0])

    def experts(self) -> LayerExperts:
        """This layer's components as a :class:`LayerExperts` (CPU copies, for saving)."""
        return LayerExperts(*(getattr(self, n).detach().cpu().clone() for n in TENSOR_NAMES))

    def projection(self, refined: bool | None = None) -> torch.Tensor:
        """``A_refined`` (R x in) when the outputs are refined (``task_stats``), else the frozen A."""
        refined = self.router.refine == "task_stats" if refined is None else refined
        return self.A * self.gain[self.member] if refined else self.A

    def keep_mask(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """Boolean mask over the components of ``h`` (..., R) that the active router keeps; None = all."""
        if self.router.impl is None:
            self.router.configure(self.router.routing)
        return self.router.impl.keep(self, x, h)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        a = self.projection()
        h = F.linear(x.to(a.dtype), a)
        # "routing": the task statistics only choose the kept components; their values stay those B was trained on
        router_h = F.linear(x.to(a.dtype), self.projection(refined=True)) if self.router.refine == "routing" else h
        keep = self.keep_mask(router_h, x)
        if keep is not None:
            h = h * keep
        if self.router.recorder is not None:
            self.router.recorder(self.expert, keep if keep is not None else torch.ones_like(h, dtype=torch.bool), h)
        scale = self.router.impl.component_scale(self)
        return result + F.linear(h * scale, self.B).to(result.dtype)

    def extra_repr(self) -> str:
        return f"layer_key={self.layer_key!r}, components={self.num_components}, experts={self.router.num_experts}"
