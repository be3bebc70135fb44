"""Collision rate of sparse masks (paper Eq. 19).

When several peers each keep a random fraction ``s_j`` of the positions of a shared B, a position *collides* if two
or more peers keep it. Collisions are where averaging mixes different peers' updates, so the rate bounds the
interference of intra-cluster averaging (paper Theorem 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["collision_rate"]


def collision_rate(sparsities: Sequence[float] | np.ndarray) -> float | np.ndarray:
    """Probability that two or more peers use the same B position (Eq. 19).

    ``S = 1 - prod_j (1 - s_j) - sum_j s_j prod_{z != j} (1 - s_z)``, i.e. one minus the probability that no peer
    or exactly one peer uses the position. ``sparsities`` holds the kept fraction ``s_j`` of each peer along the
    last axis; extra leading axes (e.g. one row per layer) give one rate per row. An empty set or a single peer
    gives 0.
    """
    s = np.asarray(sparsities, dtype=np.float64)
    if s.size and (not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(f"sparsities must lie in [0, 1], got {s.tolist()}")
    if s.ndim == 0:
        s = s[None]
    if s.shape[-1] < 2:  # no collision is possible (the formula below leaves ~1e-17 in floating point)
        zero = np.zeros(s.shape[:-1])
        return float(zero) if zero.ndim == 0 else zero
    q = 1.0 - s
    none = np.prod(q, axis=-1)
    # prod over z != j computed without division so that s_j = 1 is exact.
    m = s.shape[-1]
    exactly_one = np.zeros(s.shape[:-1])
    for j in range(m):
        others = np.delete(q, j, axis=-1)
        exactly_one = exactly_one + s[..., j] * np.prod(others, axis=-1)
    rate = np.clip(1.0 - none - exactly_one, 0.0, 1.0)
    return float(rate) if np.ndim(rate) == 0 else rate
