"""What a simulated run sets up from its settings: its tasks, base model, hub, the peers' data shards and terms.

The runner, the pre-flight (``--dry-run``), the study and the tuning all load through these, so a run and its
pre-flight see the same tasks, model and hub.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sorlora_gossip import Hub
from sorlora_gossip.hub import open_hub

from ..data.examples import Task
from ..data.registry import load_tasks as load_named_tasks
from ..protocol.terms import CollabTerms
from ..runtime.model_loading import TINY_BASE_ID, load_base
from ..runtime.workspace import adapter_name
from .config import ExperimentConfig

__all__ = [
    "check_run_dir_settings",
    "collab_id",
    "load_model",
    "load_tasks",
    "open_run_hub",
    "peer_repo",
    "resolve_device",
    "task_shards",
    "terms_for",
]


def load_tasks(cfg: ExperimentConfig) -> dict[str, Task]:
    """The run's tasks with fixed splits (registered names, ``synthetic-<word>`` or task files)."""
    return load_named_tasks(cfg.tasks, n_train=cfg.n_train, n_test=cfg.n_test, n_validation=cfg.n_validation,
                            seed=cfg.seed)  # fmt: skip


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible (e.g. to a Ray actor given one), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(cfg: ExperimentConfig) -> tuple[torch.nn.Module, Any, str]:
    """(base model, tokenizer, portable base id) for ``cfg.model`` (``tiny-random``: a tiny Llama for tests)."""
    return load_base(model=cfg.model)


def open_run_hub(cfg: ExperimentConfig, run_dir: Path) -> tuple[Hub, str]:
    """The hub of a run and its location: a Hub endpoint if ``cfg.hub`` is set, else a LocalHub in the run dir."""
    location = cfg.hub or str(Path(run_dir) / "hub")
    return open_hub(location, namespace=cfg.hub_namespace), location


def task_shards(cfg: ExperimentConfig, tasks: Mapping[str, Task]) -> dict[int, list]:
    """Each peer's training data: peers that share a task split its training set between them."""
    shards: dict[int, list] = {}
    for task in tasks.values():
        holders = [p for p in range(cfg.peers) if cfg.task_of(p) == task.name]
        for k, peer in enumerate(holders):
            shards[peer] = task.train[k :: len(holders)]
    empty = [p for p in range(cfg.peers) if not shards.get(p)]
    if empty:
        raise ValueError(f"peers {empty} have no training data: raise n_train or lower peers")
    return shards


def terms_for(cfg: ExperimentConfig, method: str, *, base_model: str, fingerprint: str) -> CollabTerms:
    """The collaboration terms the simulation of ``method`` runs under (every peer pins them)."""
    return CollabTerms(
        base_model=base_model, base_fingerprint=fingerprint, method=method, rank=cfg.rank, lora_alpha=cfg.lora_alpha,
        target_modules=tuple(cfg.target_modules), sparsity=cfg.sparsity, sparsity_allocation=cfg.sparsity_allocation,
        payload_dtype=cfg.payload_dtype, seed=cfg.seed, rounds=cfg.rounds, local_steps=cfg.local_steps,
        batch_size=cfg.batch_size, max_len=cfg.max_len, lr=float(cfg.lr[method]), precision=cfg.precision,
        inter_cluster_every=cfg.inter_cluster_every, s_max=cfg.s_max, degree=cfg.degree,
        router_top_k=cfg.router_top_k, router_refine=cfg.router_refine, max_members=cfg.peers, peers_per_user=cfg.peers,
        router=cfg.router, centroid_epsilon=cfg.centroid_epsilon,
        round_timeout_s=cfg.pull_timeout, publish_base=base_model == TINY_BASE_ID, aggregation=cfg.aggregation,
        test_share=0.0,  # the run's tasks hold their own test splits, scored by the evaluator: every shard trains
    )  # fmt: skip


def peer_repo(cfg: ExperimentConfig, method: str, peer: int) -> str:
    """The simulated peer ``peer``'s repo id in ``method`` (sorted ids follow peer numbers)."""
    return f"{cfg.hub_namespace}/{method}-{adapter_name(peer)}"


def check_run_dir_settings(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Raise ValueError if ``run_dir`` already holds a run with other settings (its ``config.json``).

    The same settings resume that run; the CLI calls this before any model loads, the runner before it starts.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    stored = ExperimentConfig.from_file(path)
    if stored.fingerprint() != cfg.fingerprint():
        raise ValueError(
            f"{run_dir} holds a run with other settings (config fingerprint {stored.fingerprint()} vs "
            f"{cfg.fingerprint()}): use another --run-dir, the same settings to resume, or delete the folder"
        )


def collab_id(cfg: ExperimentConfig, method: str) -> str:
    """The collaboration repo of ``method`` in a run."""
    return f"{cfg.hub_namespace}/collab-{method}"
