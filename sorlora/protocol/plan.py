"""The plan of a collaboration: a pure function of its terms and the registrations at one pinned commit.

Every member computes it and gets the same bytes: members are ordered by peer id (their index is their slot of
the orthogonal A and their adapter name), inputs are integers (kept entries per layer, positions in millimetres,
training-set sizes), every tie is broken by index, and ``plan.json`` records the hash of its inputs so that a
mismatch names its cause. The topology of each method comes from :data:`TOPOLOGIES`, one function per kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from peft_sorlora.projection import derive_seed
from sorlora_gossip.topology import cluster_topology, random_topology, single_cluster

from .terms import CollabTerms, Registration, TermsError, sha256_json

__all__ = [
    "PLAN_FORMAT",
    "PlanInputs",
    "PlanMismatch",
    "TOPOLOGIES",
    "compute_plan",
    "plan_differences",
    "plan_graph",
    "default_position_mm",
]

PLAN_FORMAT = "sorlora-plan/1"
RADIUS_MM = 100_000  # peers without a position estimate are placed in this disk (the channel model's default area)


class PlanMismatch(TermsError):
    """The committed plan differs from the one this member computes; the message names what differs."""


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
        layer_weights=[regs[0].sizes[k] for k in layers],
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


def compute_plan(terms: CollabTerms, registrations: Sequence[Registration], *, collab_commit: str) -> dict[str, Any]:
    """The plan (JSON-ready) for ``registrations`` made at ``collab_commit`` under ``terms``."""
    regs = tuple(sorted(registrations, key=lambda r: r.peer))
    if not regs:
        raise TermsError("no member registered: there is nothing to plan")
    ids = [r.peer for r in regs]
    if len(set(ids)) != len(ids):
        raise TermsError(f"peers registered twice: {sorted({p for p in ids if ids.count(p) > 1})}")
    wrong = [r.peer for r in regs if r.terms_sha256 != terms.sha256()]
    if wrong:
        raise TermsError(f"members {wrong} registered under other terms (terms sha {terms.sha256()[:12]} expected)")
    inputs = PlanInputs(terms=terms, members=regs)
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
        "weights": {r.peer: r.n_train for r in regs},
        "positions_mm": {r.peer: list(r.position_mm or default_position_mm(r.peer, terms.seed)) for r in regs},
    }
    plan["plan_sha256"] = sha256_json(plan)
    return plan


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
