"""Who talks to whom: the paper's cluster topology (Sec. IV-C) and the baseline topologies, as networkx graphs.

Every function returns an undirected ``nx.Graph`` whose nodes are peers ``0..n-1`` with a ``cluster`` attribute
(an int) and, where positions are known, a ``pos`` attribute (x, y in metres). Edges are the links over which peers
exchange adapters every round. The graph attribute ``kind`` names the topology.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np

from peft_sorlora.collision import collision_rate
from sorlora_gossip.wireless import DEFAULT_CHANNEL, ChannelParams, channel_gains, peer_power

__all__ = [
    "MIN_SILHOUETTE",
    "SAME_TASK_DISTANCE",
    "SAME_TASK_RATIO",
    "auto_cut",
    "budget_distances",
    "signature_distances",
    "silhouette",
    "statistics_distances",
    "task_cut",
    "cluster_topology",
    "cluster_collision_rate",
    "random_topology",
    "single_cluster",
    "ring",
    "fully_connected",
    "clusters",
    "neighbours",
]


def cluster_collision_rate(
    sparsities: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    *,
    layer_weights: Sequence[float] | None = None,
) -> float:
    """Collision rate S (Eq. 19) of a set of peers, averaged over layers.

    ``sparsities`` is (peers,) for one kept fraction per peer, or (peers, layers) for per-layer fractions; per-layer
    rates are averaged with ``layer_weights`` (e.g. the number of B entries per layer; equal weights by default).
    Fewer than two peers give exactly 0.
    """
    s = np.asarray(sparsities, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2:
        raise ValueError(f"sparsities must be (peers,) or (peers, layers), got shape {s.shape}")
    per_layer = np.asarray(collision_rate(s.T), dtype=np.float64).reshape(-1)
    if s.shape[0] < 2:  # no collision is possible; Eq. 19 in floating point leaves ~1e-17 otherwise
        per_layer = np.zeros_like(per_layer)
    if layer_weights is None:
        return float(per_layer.mean()) if per_layer.size else 0.0
    w = np.asarray(layer_weights, dtype=np.float64)
    if w.shape != per_layer.shape or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"layer_weights must be {per_layer.size} non-negative numbers with a positive sum")
    return float(np.dot(per_layer, w) / w.sum())


MIN_SILHOUETTE = 0.25
"""Automatic clusters (``s_max=None``): the average-linkage level whose partition has the best mean silhouette is
taken when that silhouette exceeds this value (Kaufman & Rousseeuw: at most 0.25, "no substantial structure"); else
the distances show no task structure and :func:`auto_cut` falls back to a fixed distance. Not higher: on the tiny
random model with 4-example calibration batches the task partition's silhouette was 0.48.

Peers of one task measure their registrations (task statistics, layer budgets) on samples of the same distribution,
so they differ by sampling noise; peers of different tasks differ by the task. On the bundled SmolLM2 with the study
preset's 8 peers (2 on each of 4 tasks, seed 0) the cosine distance of the task statistics was <= 0.005 within a task
and >= 0.012 across: silhouette 0.83 at the 4 tasks, which it recovers (adjusted Rand index 1); its layer budgets do
not separate those tasks (their best partition, silhouette 0.45, is not the tasks: adjusted Rand index 0.33)."""

SAME_TASK_DISTANCE = 0.1
"""Fallback cut on layer-budget distances (:func:`budget_distances`) where no partition exceeds
:data:`MIN_SILHOUETTE` (every peer on one task, every peer on its own, or two or three peers): one tenth of two
peers' kept entries placed in other layers."""


SAME_TASK_RATIO = 4.0
"""Automatic clusters from prompt signatures (:func:`signature_distances`) where the distances show no task
structure (:func:`task_cut` finds none: one task, each peer its own, or two or three peers): peers merge while their
average-linkage distance is at most this. The distance is a two-sample statistic whose expectation is 1 for two
samples of one distribution, so 4 is four times the noise's scale, fixed before seeing any registration: peers
whose prompts cannot be told apart merge, others do not."""


def signature_distances(
    means: Sequence[Any], prompts: Sequence[int], noise_sigmas: Sequence[float] | None = None
) -> np.ndarray:
    """Pairwise distance (n, n) of the peers' prompt signatures: ``means[i]`` the mean of peer i's ``prompts[i]``
    unit-norm pooled prompt vectors (:func:`moe_router.centroids.prompt_mean`), ``noise_sigmas[i]`` the standard
    deviation of the Gaussian privacy noise added to each coordinate of it (0 without).

    ``d_ij = |m_i - m_j|^2 / (v_i / (n_i - 1) + v_j / (n_j - 1) + D (s_i^2 + s_j^2))``: the squared distance of the
    two means over its expectation when both samples come from one distribution (the sampling variance of each mean,
    from its spread ``v = 1 - |m|^2``, the mean's deficit from unit norm, plus the noise's ``D s^2`` over the D
    coordinates). About 1 for two peers of one task whatever the model, the width or the noise; large across
    tasks, in proportion to how many prompts each averaged. Rounded to 1e-9: every member computes the same plan."""
    m = [np.asarray(x, dtype=np.float64).reshape(-1) for x in means]
    n = len(m)
    if len(prompts) != n or (noise_sigmas is not None and len(noise_sigmas) != n):
        raise ValueError("means, prompts and noise_sigmas must hold one entry per peer")
    if n and any(x.shape != m[0].shape for x in m):
        raise ValueError("every mean must have the same width")
    if any(int(k) < 2 for k in prompts):
        raise ValueError("each mean must average at least 2 prompts")
    width = m[0].size if n else 0
    sigma2 = np.zeros(n) if noise_sigmas is None else np.asarray(noise_sigmas, dtype=np.float64) ** 2
    # the sampling variance of each mean; with noise, |m|^2 is inflated by D s^2 on average, taken back
    spread = np.array([max(1.0 - (float(x @ x) - width * s2), 0.0) for x, s2 in zip(m, sigma2, strict=True)])
    var = spread / (np.asarray(prompts, dtype=np.float64) - 1.0) + width * sigma2
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            gap = float(((m[i] - m[j]) ** 2).sum())
            d[i, j] = d[j, i] = round(gap / max(var[i] + var[j], 1e-12), 9)
    return d


def statistics_distances(statistics: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Pairwise distance (n, n) of the peers' registered task statistics (mean layer inputs on the bare base, one
    vector per layer): the cosine distance per layer, averaged over the layers every peer has, rounded to 1e-9 so
    that every member computes the same plan from the same bytes.

    The statistics describe what the peer's prompts look like to the base model, layer by layer: a fingerprint of
    its task that every member of an implicit-MoE collaboration already registers."""
    if not statistics:
        return np.zeros((0, 0))
    keys = sorted(set.intersection(*(set(st) for st in statistics)))
    if not keys:
        raise ValueError("the task statistics share no layer")
    vectors = [
        [np.asarray(st[k], dtype=np.float64).reshape(-1) for k in keys] for st in statistics
    ]  # peers x layers x width
    n = len(vectors)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            per_layer = []
            for a, b in zip(vectors[i], vectors[j], strict=True):
                norm = float(np.linalg.norm(a) * np.linalg.norm(b))
                per_layer.append(1.0 - float(np.dot(a, b)) / norm if norm > 0 else (0.0 if a.shape == b.shape else 1.0))
            d[i, j] = d[j, i] = round(float(np.mean(per_layer)), 9)
    return d


def budget_distances(
    sparsities: np.ndarray | Sequence[Sequence[float]], *, layer_weights: Sequence[float] | None = None
) -> np.ndarray:
    """Pairwise distance (n, n) of the peers' layer-wise budgets: the share of two peers' kept B entries that sit in
    different layers (Bray-Curtis: ``sum_l w_l |s_al - s_bl| / sum_l w_l (s_al + s_bl)``, 0 for equal budgets, 1 for
    budgets on disjoint layers; ``w_l`` the entries per layer, equal by default).

    The budget follows the spectra of the peer's own calibration inputs (Eq. 20-22), so it is a fingerprint of the
    peer's task that every member already holds: it is what lets clusters follow the tasks."""
    s = np.asarray(sparsities, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    w = np.ones(s.shape[1]) if layer_weights is None else np.asarray(layer_weights, dtype=np.float64)
    if s.ndim != 2 or w.shape != (s.shape[1],) or np.any(w < 0):
        raise ValueError(f"sparsities must be (peers, layers) with one non-negative weight per layer, got {s.shape}")
    kept = s * w  # kept entries per layer (in units of the weights)
    diff = np.abs(kept[:, None, :] - kept[None, :, :]).sum(-1)
    total = kept.sum(-1)[:, None] + kept.sum(-1)[None, :]
    return np.divide(diff, total, out=np.zeros_like(diff), where=total > 0)


def _average_linkage(distances: np.ndarray, a: Sequence[int], b: Sequence[int]) -> float:
    """Mean distance between the members of two clusters (UPGMA), rounded so that float noise breaks no tie."""
    return round(float(distances[np.ix_(list(a), list(b))].mean()), 12)


def _upgma(distances: np.ndarray, cut: float) -> tuple[list[tuple[int, ...]], list[float]]:
    """Average linkage without other constraints, merging while the nearest pair is within ``cut``: the groups it
    forms and the distances of its merges (non-decreasing; ties go to the lowest indices)."""
    groups: list[tuple[int, ...]] = [(v,) for v in range(distances.shape[0])]
    heights: list[float] = []
    while len(groups) > 1:
        link, a, b = min(
            (_average_linkage(distances, groups[a], groups[b]), a, b)
            for a in range(len(groups))
            for b in range(a + 1, len(groups))
        )
        if link > cut:
            break
        heights.append(link)
        groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [tuple(sorted(groups[a] + groups[b]))]
    return groups, heights


def silhouette(distances: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Mean silhouette of a partition (Rousseeuw 1987): per peer ``(b - a) / max(a, b)`` with ``a`` its mean distance
    to its own group and ``b`` to the nearest other group; 0 for a peer alone in its group."""
    d = np.asarray(distances, dtype=np.float64)
    label = {v: c for c, g in enumerate(groups) for v in g}
    values = []
    for v in range(d.shape[0]):
        own = [u for u in groups[label[v]] if u != v]
        if not own or len(groups) < 2:
            values.append(0.0)
            continue
        a = float(d[v, own].mean())
        b = min(float(d[v, list(g)].mean()) for c, g in enumerate(groups) if c != label[v])
        values.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(values)) if values else 0.0


def task_cut(distances: np.ndarray) -> float | None:
    """The largest merge distance at which the distances show tasks, or None where they show no structure.

    Merge the peers by average linkage without constraints; among its levels with 2 to n - 1 groups (where the merge
    distance grows from one level to the next) take the one with the best :func:`silhouette` (ties: fewer groups) if it
    exceeds :data:`MIN_SILHOUETTE`, and cut at its last merge. A pure function of the distances: every member finds
    the same cut.
    """
    d = np.asarray(distances, dtype=np.float64)
    n = d.shape[0]
    _, heights = _upgma(d, float("inf"))
    best: tuple[float, int, float] | None = None  # (silhouette, -groups, cut)
    for merges in range(1, n - 1):  # after `merges` merges there are n - merges groups
        cut = heights[merges - 1]
        if heights[merges] <= cut:  # the next merge is as near: no cut separates these levels
            continue
        score = round(silhouette(d, _upgma(d, cut)[0]), 9)
        if best is None or (score, -(n - merges)) > best[:2]:
            best = (score, -(n - merges), cut)
    return best[2] if best is not None and best[0] > MIN_SILHOUETTE else None


def auto_cut(distances: np.ndarray, *, fallback: float = SAME_TASK_DISTANCE) -> float:
    """:func:`task_cut`, or ``fallback`` where the distances show no structure (one task, each peer its own task, or
    two or three peers)."""
    cut = task_cut(distances)
    return fallback if cut is None else cut


def _positions_and_neighbourhood(positions_or_graph: np.ndarray | nx.Graph) -> tuple[np.ndarray, nx.Graph]:
    """Positions (n, 2) and the graph of who can reach whom (complete when only positions are given)."""
    if isinstance(positions_or_graph, nx.Graph):
        g = positions_or_graph
        n = g.number_of_nodes()
        if set(g.nodes) != set(range(n)):
            raise ValueError("graph nodes must be the integers 0..n-1")
        missing = [v for v in range(n) if "pos" not in g.nodes[v]]
        if missing:
            raise ValueError(f"graph nodes {missing} have no 'pos' attribute (x, y in metres)")
        pos = np.array([g.nodes[v]["pos"] for v in range(n)], dtype=np.float64).reshape(n, 2)
        reach = nx.Graph()
        reach.add_nodes_from(range(n))
        reach.add_edges_from(g.edges)
        return pos, reach
    pos = np.asarray(positions_or_graph, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions must be an (n, 2) array, got shape {pos.shape}")
    return pos, nx.complete_graph(pos.shape[0])


def _cluster_power(
    members: Sequence[int], gains: np.ndarray, payload_bits: float, channel: ChannelParams, delay_bound_s: float | None
) -> float:
    """Total Lemma-1 power of a cluster in which every member sends the payload to every other member within the
    delay bound; ``inf`` when some member would need more than ``p_max``."""
    total = 0.0
    for i in members:
        others = [j for j in members if j != i]
        power = peer_power(payload_bits, gains[i, others], params=channel, delay_bound_s=delay_bound_s)
        if not power <= channel.p_max_w:
            return float("inf")
        total += power
    return total


def cluster_topology(
    positions_or_graph: np.ndarray | nx.Graph,
    sparsities: np.ndarray | Sequence[float] | Sequence[Sequence[float]],
    *,
    s_max: float | None,
    payload_bits: float,
    channel: ChannelParams = DEFAULT_CHANNEL,
    gains: np.ndarray | None = None,
    seed: int = 0,
    layer_weights: Sequence[float] | None = None,
    delay_bound_s: float | None = None,
    task_statistics: Sequence[Mapping[str, Any]] | None = None,
    task_signatures: Sequence[tuple[Any, int, float]] | None = None,
) -> nx.Graph:
    """Agglomerative (AGNES) clustering of peers by collision rate under power/delay constraints (Sec. IV-C).

    Start with singletons; repeatedly merge the pair of neighbouring clusters whose union has the lowest collision
    rate S (``cluster_collision_rate``), among unions with ``S <= s_max`` in which every member can reach every
    other member with ``payload_bits`` per link within the delay bound and ``p_max`` (Lemma 1); stop when no such
    merge is left. Ties in S (peers with equal budgets) go to the union needing the least total power. Two clusters neighbour when an edge of ``positions_or_graph`` joins them (all pairs when
    positions are given). ``gains`` defaults to ``channel_gains(positions, seed=seed, params=channel)``.

    Returns a graph with intra-cluster edges (a clique per cluster; edge attr ``gain``), node attrs ``cluster``,
    ``pos``, ``sparsity``, and graph attrs ``collision_rate`` (cluster id -> S), ``s_max``, ``payload_bits``,
    ``channel``, ``gains``, ``kind="cluster"``. Cluster ids are 0.. in order of each cluster's smallest peer.

    ``s_max=None`` (automatic, clusters that follow the tasks without tuning): the merge order is the average-linkage
    distance of the peers' registered ``task_signatures`` (per peer its prompt mean, prompts and noise sigma:
    :func:`signature_distances`; the cut :func:`task_cut`, else :data:`SAME_TASK_RATIO`) when given; else the distance of the peers' registered ``task_statistics`` (:func:`statistics_distances`) when
    given and showing tasks (:func:`task_cut`), else of their layer budgets (:func:`budget_distances`); ties by S,
    then power; merges stop at the cut
    :func:`auto_cut` chooses from those distances, and ``s_max`` becomes the largest collision rate among the groups
    that cut forms without power constraints: the bound is chosen from the registrations, and every cluster meets it.
    The graph records it (``s_max``) with ``auto=True``, the cut (``distance_cut``) and what the distances were
    measured on (``distance_basis``: ``"signatures"``, ``"statistics"`` or ``"budgets"``).
    """
    auto = s_max is None
    if s_max is not None and not 0.0 <= s_max <= 1.0:
        raise ValueError(f"s_max must lie in [0, 1], got {s_max}")
    if not payload_bits >= 0:
        raise ValueError(f"payload_bits must be non-negative, got {payload_bits}")
    pos, reach = _positions_and_neighbourhood(positions_or_graph)
    n = pos.shape[0]
    s = np.asarray(sparsities, dtype=np.float64)
    if s.ndim not in (1, 2) or s.shape[0] != n:
        raise ValueError(
            f"sparsities must have one entry (or one row of per-layer values) per peer ({n}), got {s.shape}"
        )
    if gains is None:
        gains = channel_gains(pos, seed=seed, params=channel)
    gains = np.asarray(gains, dtype=np.float64)
    if gains.shape != (n, n):
        raise ValueError(f"gains must be ({n}, {n}), got {gains.shape}")

    def rate(members: Sequence[int]) -> float:
        return cluster_collision_rate(s[list(members)], layer_weights=layer_weights)

    distances = cut = basis = None
    if auto:
        if task_signatures is not None:
            if len(task_signatures) != n:
                raise ValueError(f"task_signatures must hold one signature per peer ({n}), got {len(task_signatures)}")
            basis = "signatures"
            distances = signature_distances(*zip(*task_signatures, strict=True)) if n else np.zeros((0, 0))
            cut = auto_cut(distances, fallback=SAME_TASK_RATIO)
        elif task_statistics is not None:
            if len(task_statistics) != n:
                raise ValueError(f"task_statistics must hold one mapping per peer ({n}), got {len(task_statistics)}")
            distances = statistics_distances(task_statistics)
            cut = task_cut(distances)  # None: no task structure (e.g. statistics drowned in privacy noise)
            basis = "statistics"
        if cut is None:
            distances = budget_distances(s if s.ndim == 2 else s[:, None], layer_weights=layer_weights)
            cut = auto_cut(distances)
            basis = "budgets"
        s_max = max((rate(m) for m in _upgma(distances, cut)[0]), default=0.0)

    groups: list[tuple[int, ...]] = [(v,) for v in range(n)]
    while len(groups) > 1:
        best: tuple[float, float, float, tuple[int, ...], int, int] | None = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if not any(reach.has_edge(i, j) for i in groups[a] for j in groups[b]):
                    continue
                # auto: the nearest budgets merge first, up to the cut; else the paper's order (lowest S first)
                link = 0.0 if distances is None else _average_linkage(distances, groups[a], groups[b])
                if cut is not None and link > cut:
                    continue
                union = tuple(sorted(groups[a] + groups[b]))
                s_union = rate(union)
                if s_union > s_max + 1e-12:
                    continue
                # S rounded so that float noise does not break ties between equal rates (equal budgets are common).
                s_key = round(s_union, 12)
                if best is not None and (link, s_key) > best[:2]:
                    continue
                power = _cluster_power(union, gains, payload_bits, channel, delay_bound_s)
                if power == float("inf"):
                    continue
                candidate = (link, s_key, power, union, a, b)
                if best is None or candidate[:4] < best[:4]:
                    best = candidate
        if best is None:
            break
        *_, union, a, b = best
        groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [union]
    groups.sort(key=min)

    g = nx.Graph(
        kind="cluster",
        auto=auto,
        distance_cut=cut,
        distance_basis=basis,
        s_max=float(s_max),
        payload_bits=float(payload_bits),
        channel=channel,
        gains=gains,
        collision_rate={c: rate(members) for c, members in enumerate(groups)},
    )
    cluster_of = {v: c for c, members in enumerate(groups) for v in members}
    for v in range(n):
        sparsity = float(s[v]) if s.ndim == 1 else tuple(float(x) for x in s[v])
        g.add_node(v, cluster=cluster_of[v], pos=(float(pos[v, 0]), float(pos[v, 1])), sparsity=sparsity)
    for members in groups:
        for k, i in enumerate(members):
            for j in members[k + 1 :]:
                g.add_edge(i, j, gain=float(gains[i, j]))
    return g


def _finish(g: nx.Graph, kind: str, positions: np.ndarray | None) -> nx.Graph:
    """Attach ``kind``, ``pos`` (if given) and ``cluster`` (one per connected component) to a baseline graph."""
    n = g.number_of_nodes()
    g.graph["kind"] = kind
    if positions is not None:
        pos = np.asarray(positions, dtype=np.float64)
        if pos.shape != (n, 2):
            raise ValueError(f"positions must be ({n}, 2), got {pos.shape}")
        for v in range(n):
            g.nodes[v]["pos"] = (float(pos[v, 0]), float(pos[v, 1]))
    components = sorted((sorted(c) for c in nx.connected_components(g)), key=min)
    for c, members in enumerate(components):
        for v in members:
            g.nodes[v]["cluster"] = c
    return g


def _check_n(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer (number of peers), got {n!r}")


def random_topology(n: int, *, degree: int, seed: int = 0, positions: np.ndarray | None = None) -> nx.Graph:
    """Random ``degree``-regular graph on ``n`` peers: the paper's DFL-LoRA / LoRI baselines (random neighbours).

    Needs ``0 <= degree < n`` and ``n * degree`` even. Every connected component gets its own ``cluster`` id (the
    baselines have no clusters; peers average with ``neighbours(G, v)``).
    """
    _check_n(n)
    if int(degree) != degree or not 0 <= degree < n or (n * degree) % 2:
        raise ValueError(
            f"a random regular graph needs 0 <= degree < n and n * degree even, got n={n}, degree={degree}"
        )
    return _finish(nx.random_regular_graph(int(degree), int(n), seed=seed), "random", positions)


def single_cluster(n: int, *, positions: np.ndarray | None = None) -> nx.Graph:
    """All ``n`` peers in one cluster (a clique): the paper's "proposed with a single cluster" ablation."""
    _check_n(n)
    return _finish(nx.complete_graph(n), "single_cluster", positions)


def ring(n: int, *, positions: np.ndarray | None = None) -> nx.Graph:
    """Ring of ``n`` peers: each exchanges with its two neighbours (one for n = 2, none for n = 1)."""
    _check_n(n)
    return _finish(nx.cycle_graph(n) if n > 2 else nx.path_graph(n), "ring", positions)


def fully_connected(n: int, *, positions: np.ndarray | None = None) -> nx.Graph:
    """Complete graph on ``n`` peers: every peer averages with all others (dense gossip baseline)."""
    _check_n(n)
    return _finish(nx.complete_graph(n), "fully_connected", positions)


def clusters(g: nx.Graph) -> list[set[Hashable]]:
    """The clusters of a topology as sets of peers, ordered by cluster id (node attribute ``cluster``)."""
    groups: dict[int, set[Hashable]] = {}
    for v, c in g.nodes(data="cluster"):
        if c is None:
            raise ValueError(f"node {v!r} has no 'cluster' attribute")
        groups.setdefault(c, set()).add(v)
    return [groups[c] for c in sorted(groups)]


def neighbours(g: nx.Graph, node: Hashable) -> list[Hashable]:
    """The peers ``node`` exchanges with every round (its graph neighbours), sorted."""
    if node not in g:
        raise ValueError(f"node {node!r} is not in the topology")
    return sorted(g.neighbors(node))
