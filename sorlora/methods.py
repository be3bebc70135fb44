"""The methods compared in one run (method.md §5): each is an adapter kind plus peer behaviours, described as data.

- ``lora``: DFL-LoRA baseline. Dense PEFT LoRA (A and B trained), FedAvg of A and B with random neighbours.
- ``lori``: the paper's LoRI baseline. Frozen random A shared by all peers (one gaussian draw) + sparse B (uniform
  sparsity, each peer its own mask); masked averaging of B with random neighbours. A peer trains and sends only its
  own mask's entries, but its forward holds the average on the union of its and its neighbours' masks (its
  neighbours' parts, frozen, each entry counted once): what neighbours contribute reaches its model. Its final
  model is that view (own adapter + the neighbour parts, published with the final adapter).
- ``solora-single``: SO-LoRA (per-peer orthogonal A, sparse B, layer-wise budget), all peers in one cluster; every
  peer's forward includes all members' parts.
- ``solora``: SO-LoRA with the collision-rate cluster topology; after the last round the clusters exchange their
  experts without averaging and every peer builds and publishes them as an implicit mixture of experts.
- ``solora-union``: ``solora-single`` without averaging (collision-free union): every member's forward holds each
  member's own part exactly as it sent it, so the cluster's forward is Σ_j (B_j ⊙ M_j) A_j with no entry averaged
  at a collision (in ``solora-single`` two members' values at a shared position are averaged, and each one then
  acts through both members' A).
- ``solora-cotrain``: ``solora`` with co-training across clusters (the paper's step 4 repeated): every
  ``cotrain_every`` rounds the clusters exchange their experts (bytes counted), and from then on each member keeps
  the other clusters' experts frozen in its forward while it trains, so its own expert learns alongside them.
- ``local``: SO-LoRA, no exchange at all.
- ``oracle``: SO-LoRA, one cluster per task, evaluated with the true task's cluster (hard routing upper bound).
  An upper bound only with at least two peers per task: with one, its clusters never aggregate (``local``).

The adapter kinds live in :mod:`sorlora.adapters`, the topologies in :data:`sorlora.plan.TOPOLOGIES` and the final
models in :data:`sorlora.final_models.FINAL_MODELS`: a new baseline is one entry in each table it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .adapters import ADAPTER_KINDS, AdapterKind

__all__ = ["MethodSpec", "METHOD_SPECS"]


@dataclass(frozen=True)
class MethodSpec:
    """How one method trains, exchanges and is evaluated."""

    name: str
    kind: AdapterKind
    topology: str = "none"  # a key of sorlora.plan.TOPOLOGIES
    # whose adapters are active in a peer's forward pass: its own; its cluster's members' parts; or its own and the
    # parts of the neighbours it last averaged with (LoRI: a shared A, so the parts are made disjoint)
    forward: Literal["own", "cluster", "neighbours"] = "own"
    # masked: the members' masked average B̄ on each member's mask; union: each member's own part, never averaged
    aggregation: Literal["masked", "union", "fedavg", "none"] = "none"
    final: str = "per-peer"  # a key of sorlora.final_models.FINAL_MODELS
    inter_cluster: bool = False  # clusters exchange their experts (without averaging) and each peer builds a MoE
    # co-training: exchange the experts every this many rounds (overriding the terms' inter_cluster_every) and keep
    # the other clusters' latest experts frozen in the forward while training; 0: never
    cotrain_every: int = 0


METHOD_SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", ADAPTER_KINDS["lora"], topology="random", aggregation="fedavg"),
    # lora with every peer's A drawn from one seed: averaging A and B separately no longer mixes unaligned factors
    "lora-shared-a": MethodSpec(
        "lora-shared-a", ADAPTER_KINDS["lora-shared-a"], topology="random", aggregation="fedavg"
    ),
    "lori": MethodSpec(
        "lori",
        ADAPTER_KINDS["lori"],
        topology="random",
        forward="neighbours",
        aggregation="masked",
        final="neighbourhood",
    ),  # fmt: skip
    "solora-single": MethodSpec(
        "solora-single",
        ADAPTER_KINDS["solora"],
        topology="single",
        forward="cluster",
        aggregation="masked",
        final="cluster",
    ),  # fmt: skip
    "solora": MethodSpec(
        "solora",
        ADAPTER_KINDS["solora"],
        topology="cluster",
        forward="cluster",
        aggregation="masked",
        final="moe",
        inter_cluster=True,
    ),  # fmt: skip
    "local": MethodSpec("local", ADAPTER_KINDS["solora"], topology="none"),
    "oracle": MethodSpec(
        "oracle", ADAPTER_KINDS["solora"], topology="task", forward="cluster", aggregation="masked", final="oracle"
    ),
}

# the diagnostics' variants: one field changed from the method they vary
METHOD_SPECS["solora-union"] = replace(METHOD_SPECS["solora-single"], name="solora-union", aggregation="union")
METHOD_SPECS["solora-cotrain"] = replace(METHOD_SPECS["solora"], name="solora-cotrain", cotrain_every=2)
