"""The methods compared in one run (method.md §5), described as data: adapter, topology, forward set, aggregation.

- ``lora``: DFL-LoRA baseline. Dense PEFT LoRA (A and B trained), FedAvg of A and B with random neighbours.
- ``lori``: frozen random A shared by all peers (one gaussian draw) + sparse B (uniform sparsity); masked
  averaging of B with random neighbours.
- ``solora-single``: SO-LoRA (per-peer orthogonal A, sparse B, layer-wise budget), all peers in one cluster; every
  peer's forward includes all members' parts.
- ``solora``: SO-LoRA with the collision-rate cluster topology; after the last round the clusters exchange their
  experts without averaging and every peer serves them as an implicit mixture of experts.
- ``local``: SO-LoRA, no exchange at all.
- ``oracle``: SO-LoRA, one cluster per task, evaluated with the true task's cluster (hard routing upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MethodSpec", "METHOD_SPECS"]


@dataclass(frozen=True)
class MethodSpec:
    """How one method trains, exchanges and is evaluated."""

    name: str
    adapter: Literal["solora", "lora"]
    projection: Literal["orthogonal", "gaussian"] = "orthogonal"
    shared_projection: bool = False  # every peer uses slot 0 of one seed (LoRI's common random A)
    allocation: Literal["uniform", "spectral_entropy", "config"] = "config"
    topology: Literal["random", "single", "cluster", "none", "task"] = "none"
    forward: Literal["own", "cluster"] = "own"  # whose adapters are active in a peer's forward pass
    aggregation: Literal["masked", "fedavg", "none"] = "none"
    final: Literal["per-peer", "cluster", "moe", "oracle"] = "per-peer"


METHOD_SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", "lora", topology="random", aggregation="fedavg"),
    "lori": MethodSpec(
        "lori",
        "solora",
        projection="gaussian",
        shared_projection=True,
        allocation="uniform",
        topology="random",
        aggregation="masked",
    ),
    "solora-single": MethodSpec(
        "solora-single", "solora", topology="single", forward="cluster", aggregation="masked", final="cluster"
    ),
    "solora": MethodSpec("solora", "solora", topology="cluster", forward="cluster", aggregation="masked", final="moe"),
    "local": MethodSpec("local", "solora", topology="none"),
    "oracle": MethodSpec("oracle", "solora", topology="task", forward="cluster", aggregation="masked", final="oracle"),
}
