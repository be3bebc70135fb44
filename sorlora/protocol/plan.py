"""The plan of a collaboration: a pure function of its terms and the registrations at one pinned commit.

Every member computes it and gets the same bytes: members are ordered by peer id (their index is their slot of
the orthogonal A and their adapter name), inputs are integers (kept entries per layer, positions in millimetres,
training-set sizes), every tie is broken by index, and ``plan.json`` records the hash of its inputs. The committed
``plan.json`` is only a cache for readers: every member uses the plan it computes, and a committed one that differs
is logged (:func:`plan_differences` names what differs) and ignored, so one member cannot stop the others by
committing a different plan first. The topology of each method comes from :data:`TOPOLOGIES`, one function per kind.

Registrations are untrusted: before any topology sees them, :func:`screen_registrations` bounds every registered
number (positions, layer sizes, kept counts, value bytes; ``n_train`` must be a positive integer) and checks them
against each other and against the majority of members (the same layers and sizes: they run the same base); a
member that fails, or whose task statistics the caller found unusable (``problems``), is excluded from the plan with
its reason (``plan["excluded"]``). The exclusion is a pure function of the same inputs, so every member excludes the
same peers; a bad registration never stops the others.

``n_train`` is a claim nobody can check, so it is never excluded for its size nor used raw: the plan's ``weights``
(:func:`plan_weights`) are the claims bounded to ``[median / WEIGHT_CAP, median x WEIGHT_CAP]`` of the kept
members' claims, in integers, and each bounded claim is recorded in ``plan["weights_bounded"]`` with its reason. A
member claiming 10^18 examples keeps its (honest or not) updates in the rounds, checked like everyone's, with at most
twice the median member's weight: excluding it would cost the honest members its data, and a larger cap costs them
the averaging (measured with 4 members: a 4x cap lost about as much as the member's exclusion, seed 0).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from peft_sorlora.projection import derive_seed
from sorlora_gossip.topology import cluster_topology, random_topology, single_cluster

from .terms import CollabTerms, Registration, TermsError, sha256_json

__all__ = [
    "MAX_LAYERS",
    "MAX_LAYER_SIZE",
    "MAX_NAME_CHARS",
    "WEIGHT_CAP",
    "MAX_POSITION_MM",
    "PLAN_FORMAT",
    "PlanInputs",
    "TOPOLOGIES",
    "compute_plan",
    "plan_differences",
    "plan_graph",
    "plan_weights",
    "default_position_mm",
    "majority",
    "screen_registrations",
]

PLAN_FORMAT = "sorlora-plan/1"
RADIUS_MM = 100_000  # peers without a position estimate are placed in this disk (the channel model's default area)
WEIGHT_CAP = 2  # a member's aggregation weight is its n_train bounded to [median / 2, 2 x median] of the members'
MAX_POSITION_MM = 10**9  # 1000 km: positions beyond are not a wireless neighbourhood
MAX_LAYERS = 10_000  # adapted layers of one base model
MAX_LAYER_SIZE = 2**31  # B entries of one layer
MAX_NAME_CHARS = 256  # a registered task name or layer name (they go into the plan, records and cards)


def default_position_mm(peer: str, seed: int) -> tuple[int, int]:
    """A deterministic position (integer mm in a 100 m disk) for a peer that registered none."""
    u = derive_seed("position", seed, peer, "r") / 2**63
    t = derive_seed("position", seed, peer, "t") / 2**63
    r, theta = RADIUS_MM * np.sqrt(u), 2 * np.pi * t
    return int(round(r * np.cos(theta))), int(round(r * np.sin(theta)))


@dataclass(frozen=True)
class PlanInputs:
    """What a topology function sees: the terms and the members (sorted by peer id) with their registrations."""

    terms: CollabTerms
    members: tuple[Registration, ...]
    # per member (same order) its registered task statistics, when every member registered usable ones (implicit-MoE
    # methods): what the automatic cluster topology measures tasks by (sorlora_gossip.topology.statistics_distances)
    statistics: tuple[Mapping[str, Any], ...] | None = None
    # per member (same order) its prompt signature (mean, prompts, noise sigma), when every member registered a
    # usable one (implicit-MoE methods): what the automatic cluster topology measures tasks by first
    # (sorlora_gossip.topology.signature_distances)
    signatures: tuple[tuple[Any, int, float], ...] | None = None

    @property
    def n(self) -> int:
        return len(self.members)

    def positions(self) -> np.ndarray:
        """Positions in metres, from the registered integer millimetres."""
        mm = [r.position_mm or default_position_mm(r.peer, self.terms.seed) for r in self.members]
        return np.asarray(mm, dtype=np.int64).astype(np.float64) / 1000.0


def _cluster(inputs: PlanInputs) -> nx.Graph:
    regs = inputs.members
    missing = [r.peer for r in regs if r.kept is None]
    if missing:
        raise TermsError(f"the cluster topology needs every member's layer budget; {missing} registered none")
    layers = sorted(regs[0].sizes)
    if any(sorted(r.sizes) != layers or [r.sizes[k] for k in layers] != [regs[0].sizes[k] for k in layers]
           for r in regs):  # fmt: skip
        raise TermsError("members registered different adapter layers: they do not run the same base model")
    sparsities = [[r.kept[k] / r.sizes[k] for k in layers] for r in regs]
    payload_bits = 8 * max(int(r.value_bytes or 0) for r in regs)
    return cluster_topology(
        inputs.positions(), sparsities, s_max=inputs.terms.s_max, payload_bits=payload_bits, seed=inputs.terms.seed,
        layer_weights=[regs[0].sizes[k] for k in layers], task_statistics=inputs.statistics,
        task_signatures=inputs.signatures,
    )  # fmt: skip


def _random(inputs: PlanInputs) -> nx.Graph:
    n = inputs.n
    if n == 1:
        return _groups(inputs, [[0]], kind="random")
    return random_topology(n, degree=min(inputs.terms.degree, n - 1), seed=inputs.terms.seed,
                           positions=inputs.positions())  # fmt: skip


def _groups(inputs: PlanInputs, groups: Sequence[Sequence[int]], *, kind: str) -> nx.Graph:
    """Cliques over ``groups`` (cluster ids in order of each group's smallest index)."""
    pos = inputs.positions()
    graph = nx.Graph(kind=kind)
    for c, members in enumerate(sorted((sorted(g) for g in groups), key=min)):
        for i in members:
            graph.add_node(i, cluster=c, pos=(float(pos[i, 0]), float(pos[i, 1])))
        graph.add_edges_from((a, b) for k, a in enumerate(members) for b in members[k + 1 :])
    return graph


def _by_task(inputs: PlanInputs) -> nx.Graph:
    tasks = sorted({r.task for r in inputs.members})
    return _groups(inputs, [[i for i, r in enumerate(inputs.members) if r.task == t] for t in tasks], kind="task")


TOPOLOGIES: dict[str, Callable[[PlanInputs], nx.Graph]] = {
    "cluster": _cluster,  # AGNES on collision rate under s_max and the channel's power/delay constraints
    "random": _random,  # random neighbours (the lora / lori baselines)
    "single": lambda inputs: (
        single_cluster(inputs.n, positions=inputs.positions())
        if inputs.n > 1
        else _groups(inputs, [[0]], kind="single")
    ),
    "none": lambda inputs: _groups(inputs, [[i] for i in range(inputs.n)], kind="none"),
    "task": _by_task,  # one cluster per task (the oracle)
}


def majority(values: Sequence[tuple[str, Any]]) -> Any:
    """The value most ``(peer, value)`` pairs hold; a tie goes to the value of the smallest peer id among the tied
    (deterministic on every member)."""
    counts: dict[str, tuple[int, str, Any]] = {}
    for peer, value in values:
        key = repr(value)
        n, first, _ = counts.get(key, (0, peer, value))
        counts[key] = (n + 1, min(first, peer), value)
    return min(counts.values(), key=lambda c: (-c[0], c[1]))[2]


def _int_ok(x: Any, lo: int, hi: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x and (hi is None or x <= hi)


def _payload_itemsize(terms: CollabTerms) -> int | None:
    import torch

    dtype = getattr(torch, str(terms.payload_dtype), None)
    return torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else None


def screen_registrations(
    terms: CollabTerms, registrations: Sequence[Registration], problems: Mapping[str, str] | None = None
) -> tuple[list[Registration], dict[str, str]]:
    """The registrations the plan may use (sorted by peer id) and the excluded ones (peer -> reason).

    Checked per member: terms hash, task and layer names of at most ``MAX_NAME_CHARS``, ``n_train`` a positive
    integer (its size is bounded by :func:`plan_weights`, not judged here), ``position_mm`` within
    ``±MAX_POSITION_MM``, at most ``MAX_LAYERS`` layers of at most ``MAX_LAYER_SIZE`` entries, ``0 <= kept <=
    sizes`` per layer, ``value_bytes`` equal to the kept entries times the payload dtype's size; then against the
    others: the layers and sizes the majority registered, the presence of a budget where the majority has one.
    ``problems`` (peer -> reason) are found by the caller (e.g. unusable task statistics) and exclude too.
    """
    problems = dict(problems or {})
    regs = sorted(registrations, key=lambda r: r.peer)
    excluded: dict[str, str] = {}
    seen: set[str] = set()
    itemsize = _payload_itemsize(terms)
    for r in regs:
        if r.peer in seen:
            excluded[r.peer] = "registered twice"
            continue
        seen.add(r.peer)
        if r.terms_sha256 != terms.sha256():
            excluded[r.peer] = f"registered under other terms ({str(r.terms_sha256)[:12]})"
        elif len(r.task) > MAX_NAME_CHARS or any(len(k) > MAX_NAME_CHARS for k in r.sizes or {}):
            excluded[r.peer] = f"a task or layer name longer than {MAX_NAME_CHARS} characters"
        elif not _int_ok(r.n_train, 1):
            excluded[r.peer] = "n_train is not a positive integer"
        elif r.position_mm is not None and not (
            len(r.position_mm) == 2 and all(_int_ok(v, -MAX_POSITION_MM, MAX_POSITION_MM) for v in r.position_mm)
        ):
            excluded[r.peer] = f"position_mm is not two integers within +-{MAX_POSITION_MM} mm"
        elif (r.kept is None) != (r.sizes is None):
            excluded[r.peer] = "kept and sizes must be registered together"
        elif r.sizes is not None and (
            len(r.sizes) > MAX_LAYERS
            or set(r.kept or {}) != set(r.sizes)
            or not all(_int_ok(v, 1, MAX_LAYER_SIZE) for v in r.sizes.values())
        ):
            excluded[r.peer] = f"sizes: more than {MAX_LAYERS} layers, layers unlike kept's, or a size not in [1, 2^31]"
        elif r.kept is not None and not all(_int_ok(r.kept[k], 0, r.sizes[k]) for k in r.sizes):  # type: ignore[index]
            excluded[r.peer] = "kept is not an integer in [0, sizes] on every layer"
        elif r.value_bytes is not None and not _int_ok(r.value_bytes, 0, MAX_LAYERS * MAX_LAYER_SIZE * 8):
            excluded[r.peer] = "value_bytes is out of bounds"
        elif (
            r.kept is not None
            and r.value_bytes is not None
            and itemsize is not None
            and r.value_bytes != sum(r.kept.values()) * itemsize
        ):
            excluded[r.peer] = (f"value_bytes {r.value_bytes} is not its {sum(r.kept.values())} kept entries x "
                                f"{itemsize} bytes")  # fmt: skip
        elif r.peer in problems:
            excluded[r.peer] = problems[r.peer]
    fine = [r for r in regs if r.peer not in excluded]
    if fine:  # the majority's layout: members of another base (or lying about theirs) are excluded
        layout = majority([(r.peer, None if r.sizes is None else sorted(r.sizes.items())) for r in fine])
        for r in fine:
            mine = None if r.sizes is None else sorted(r.sizes.items())
            if mine != layout:
                excluded[r.peer] = (
                    "registered no layer budget where the other members did" if mine is None
                    else "registered other adapter layers or sizes than the majority of members"
                )  # fmt: skip
    return [r for r in regs if r.peer not in excluded], dict(sorted(excluded.items()))


def _every_member(per_peer: Mapping[str, Any] | None, regs: Sequence[Registration]) -> tuple[Any, ...] | None:
    """``per_peer``'s value for each of ``regs`` (in order), or None unless every one of them has a value."""
    if per_peer is None or any(r.peer not in per_peer for r in regs):
        return None
    return tuple(per_peer[r.peer] for r in regs)


def compute_plan(
    terms: CollabTerms,
    registrations: Sequence[Registration],
    *,
    collab_commit: str,
    problems: Mapping[str, str] | None = None,
    statistics: Mapping[str, Mapping[str, Any]] | None = None,
    signatures: Mapping[str, tuple[Any, int, float]] | None = None,
) -> dict[str, Any]:
    """The plan (JSON-ready) for ``registrations`` made at ``collab_commit`` under ``terms``; the members that
    :func:`screen_registrations` excludes (or that ``problems`` names) are in ``plan["excluded"]`` with the reason,
    and nowhere else. ``statistics`` and ``signatures`` (peer -> registered task statistics / (prompt mean,
    prompts, noise sigma)) feed the automatic cluster topology; each is used only if every kept member has one."""
    kept, excluded = screen_registrations(terms, registrations, problems)
    regs = tuple(kept)
    if not regs:
        raise TermsError(f"no usable registration: there is nothing to plan (excluded: {excluded})")
    ids = [r.peer for r in regs]
    weights, bounded = plan_weights(regs)
    inputs = PlanInputs(terms=terms, members=regs, statistics=_every_member(statistics, regs),
                        signatures=_every_member(signatures, regs))  # fmt: skip
    graph = TOPOLOGIES[terms.spec.topology](inputs)
    cluster_ids = sorted({graph.nodes[i]["cluster"] for i in graph.nodes})
    clusters = [[ids[i] for i in sorted(graph.nodes) if graph.nodes[i]["cluster"] == c] for c in cluster_ids]
    plan = {
        "format": PLAN_FORMAT,
        "collab_commit": collab_commit,
        "terms_sha256": terms.sha256(),
        "inputs_sha256": sha256_json([r.to_dict() for r in regs]),
        "topology": str(graph.graph.get("kind", terms.spec.topology)),
        "members": ids,
        "clusters": clusters,
        "neighbours": {ids[i]: [ids[j] for j in sorted(graph.neighbors(i))] for i in range(len(ids))},
        "weights": weights,
        "positions_mm": {r.peer: list(r.position_mm or default_position_mm(r.peer, terms.seed)) for r in regs},
    }
    if graph.graph.get("auto"):  # automatic clusters: what they were measured by, and where the merging stopped
        plan["clusters_by"] = {"basis": graph.graph["distance_basis"], "cut": graph.graph["distance_cut"],
                               "s_max": graph.graph["s_max"]}  # fmt: skip
    if excluded:  # only when there is one, so the plans of clean collaborations keep their bytes
        plan["excluded"] = excluded
    if bounded:  # likewise
        plan["weights_bounded"] = bounded
    plan["plan_sha256"] = sha256_json(plan)
    return plan


def plan_weights(registrations: Sequence[Registration]) -> tuple[dict[str, int], dict[str, str]]:
    """Each member's aggregation weight (peer -> int) and the claims that were bounded (peer -> reason).

    A weight is the member's registered ``n_train`` clamped to ``[max(1, median // WEIGHT_CAP), median *
    WEIGHT_CAP]``, ``median`` the low median of the members' claims: integers throughout, so a claim such as
    ``10**400`` never overflows a float and every member computes the same weights. No member can hold more than
    ``WEIGHT_CAP`` times the median member's weight on an entry, however large its claim.
    """
    claims = [r.n_train for r in registrations]
    median = statistics.median_low(claims)
    lo, hi = max(1, median // WEIGHT_CAP), median * WEIGHT_CAP
    weights, bounded = {}, {}
    for r in registrations:
        w = min(max(r.n_train, lo), hi)
        weights[r.peer] = w
        if w != r.n_train:
            claim = str(r.n_train) if r.n_train < 10**12 else f"about 10^{len(str(r.n_train)) - 1}"
            bounded[r.peer] = f"n_train {claim} bounded to {w} ({WEIGHT_CAP}x bounds of the members' median {median})"
    return weights, bounded


def plan_differences(committed: Any, computed: dict[str, Any]) -> list[str]:
    """What differs between a committed plan and the one computed here, one line per field (empty: equal)."""
    if not isinstance(committed, dict):
        return [f"plan.json is a {type(committed).__name__}, not a plan"]
    out = []
    for key in computed:
        if key == "plan_sha256" or committed.get(key) == computed[key]:
            continue
        if key in ("terms_sha256", "inputs_sha256", "collab_commit"):
            out.append(f"{key}: committed {str(committed.get(key))[:16]} vs computed {computed[key][:16]}")
        else:
            out.append(f"{key}: committed {committed.get(key)!r} vs computed {computed[key]!r}")
    extra = sorted(set(committed) - set(computed))
    if extra:
        out.append(f"unknown fields {extra}")
    return out


def plan_graph(plan: dict[str, Any]) -> nx.Graph:
    """The plan's topology as a graph over member indices (node attrs ``cluster``, ``pos``), for accounting."""
    ids = plan["members"]
    index = {p: i for i, p in enumerate(ids)}
    graph = nx.Graph(kind=plan.get("topology"))
    for c, members in enumerate(plan["clusters"]):
        for p in members:
            x, y = plan["positions_mm"][p]
            graph.add_node(index[p], cluster=c, pos=(x / 1000.0, y / 1000.0))
    for p, neighbours in plan["neighbours"].items():
        graph.add_edges_from((index[p], index[q]) for q in neighbours)
    return graph
