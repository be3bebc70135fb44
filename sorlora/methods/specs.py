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

This table is the one list of method names: the settings (:mod:`sorlora.simulation.config`), the terms and the CLI
read them from here. A method is one entry; what it combines lives in tables of its own: the adapter kinds in
:data:`sorlora.methods.kinds.ADAPTER_KINDS`, the aggregation and forward rules in :mod:`sorlora.methods.rules`, the
topologies in :data:`sorlora.protocol.plan.TOPOLOGIES` and the final models in :data:`sorlora.protocol.publish.PUBLISHERS`
(what a peer publishes) and :data:`sorlora.evaluation.final_models.FINAL_MODELS` (how the evaluator scores it).
This module imports no torch (``sorlora --help`` lists the methods): a spec names its adapter kind, resolved on use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kinds import AdapterKind

__all__ = ["MethodSpec", "METHOD_SPECS", "METHODS", "EXTRA_METHODS", "ALL_METHODS", "method_names"]


@dataclass(frozen=True)
class MethodSpec:
    """How one method trains, exchanges and is evaluated."""

    name: str
    kind_name: str  # a key of sorlora.methods.kinds.ADAPTER_KINDS
    topology: str = "none"  # a key of sorlora.protocol.plan.TOPOLOGIES
    # whose adapters are active in a peer's forward pass (a key of sorlora.methods.rules.FORWARD_RULES): its own;
    # its cluster's members' parts; or its own and the parts of the neighbours it last averaged with (LoRI)
    forward: str = "own"
    # a key of sorlora.methods.rules.AGGREGATIONS: masked (the members' masked average B̄ on each member's mask),
    # union (each member's own part, never averaged), fedavg (dense average of A and B), none
    aggregation: str = "none"
    final: str = "per-peer"  # a key of sorlora.protocol.publish.PUBLISHERS and sorlora.evaluation.final_models
    inter_cluster: bool = False  # clusters exchange their experts (without averaging) and each peer builds a MoE
    # co-training: exchange the experts every this many rounds (overriding the terms' inter_cluster_every) and keep
    # the other clusters' latest experts frozen in the forward while training; 0: never
    cotrain_every: int = 0
    default: bool = False  # compared by a run that names no methods (the settings' default ``methods``)

    @property
    def kind(self) -> AdapterKind:
        """The adapter kind (imported on first use: it needs torch and peft)."""
        from .kinds import ADAPTER_KINDS  # noqa: PLC0415 - keeps this table importable without torch

        return ADAPTER_KINDS[self.kind_name]


METHOD_SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", "lora", topology="random", aggregation="fedavg", default=True),
    # lora with every peer's A drawn from one seed: averaging A and B separately no longer mixes unaligned factors
    "lora-shared-a": MethodSpec("lora-shared-a", "lora-shared-a", topology="random", aggregation="fedavg"),
    "lori": MethodSpec(
        "lori",
        "lori",
        topology="random",
        forward="neighbours",
        aggregation="masked",
        final="neighbourhood",
        default=True,
    ),  # fmt: skip
    "solora-single": MethodSpec(
        "solora-single",
        "solora",
        topology="single",
        forward="cluster",
        aggregation="masked",
        final="cluster",
        default=True,
    ),  # fmt: skip
    "solora": MethodSpec(
        "solora",
        "solora",
        topology="cluster",
        forward="cluster",
        aggregation="masked",
        final="moe",
        inter_cluster=True,
        default=True,
    ),  # fmt: skip
    "local": MethodSpec("local", "solora", topology="none", default=True),
    "oracle": MethodSpec(
        "oracle", "solora", topology="task", forward="cluster", aggregation="masked", final="oracle", default=True
    ),
}

# the diagnostics' variants: one field changed from the method they vary
METHOD_SPECS["solora-union"] = replace(
    METHOD_SPECS["solora-single"], name="solora-union", aggregation="union", default=False
)
METHOD_SPECS["solora-cotrain"] = replace(METHOD_SPECS["solora"], name="solora-cotrain", cotrain_every=2, default=False)


def method_names() -> tuple[str, ...]:
    """Every method of the table now, the default ones first (a method added to :data:`METHOD_SPECS` at run time,
    e.g. by a test, included)."""
    return tuple(n for n, s in METHOD_SPECS.items() if s.default) + tuple(
        n for n, s in METHOD_SPECS.items() if not s.default
    )


# The method names, from the table: those a run compares by default, and the further ones a run may name.
METHODS: tuple[str, ...] = tuple(n for n, s in METHOD_SPECS.items() if s.default)
EXTRA_METHODS: tuple[str, ...] = tuple(n for n, s in METHOD_SPECS.items() if not s.default)
ALL_METHODS: tuple[str, ...] = method_names()
