"""The frozen projection A of a peer, as a pure function of ``(projection, seed, slot, layer)``.

Because A is derived, peers exchange a seed and a slot instead of the matrix. Both modes give rows of (about) unit
norm, so each entry of ``A x`` has the scale ``‖x‖ / sqrt(in_features)`` of an entry of a rotated ``x``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

__all__ = ["projection_matrix", "derive_seed"]


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@lru_cache(maxsize=16)
def _orthogonal_basis(seed: int, in_features: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed("orthogonal", seed, in_features))
    gaussian = torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique (Haar-distributed) basis
    return q.T.contiguous()  # rows are orthonormal


def projection_matrix(
    *,
    projection: str,
    seed: int,
    slot: int,
    r: int,
    in_features: int,
    layer_key: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The frozen A (``r x in_features``) of the peer with this ``(projection, seed, slot)`` on one layer.

    ``orthogonal``: rows ``slot*r .. (slot+1)*r`` of one random orthogonal basis of R^in per ``(seed, in_features)``
    (shared by all layers of that width), so different slots give ``A_i A_j^T = 0`` exactly. ``gaussian`` (the
    paper): i.i.d. ``N(0, 1/in_features)`` entries drawn from ``(seed, slot, layer_key)``; different slots are only
    nearly orthogonal, increasingly so as ``in_features`` grows.
    """
    if r <= 0 or in_features <= 0:
        raise ValueError(f"r and in_features must be positive, got r={r}, in_features={in_features}")
    if projection == "orthogonal":
        capacity = in_features // r
        if not 0 <= slot < capacity:
            raise ValueError(
                f"slot must be in [0, {capacity - 1}] for layer {layer_key!r} (in_features={in_features}, r={r}), "
                f"got {slot}"
            )
        basis = _orthogonal_basis(seed, in_features)
        return basis[slot * r : (slot + 1) * r].to(dtype).clone()
    if projection == "gaussian":
        generator = torch.Generator().manual_seed(derive_seed("gaussian", seed, slot, layer_key))
        a = torch.randn(r, in_features, generator=generator, dtype=torch.float64) / in_features**0.5
        return a.to(dtype)
    raise ValueError(f"projection must be 'orthogonal' or 'gaussian', got {projection!r}")
