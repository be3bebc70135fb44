"""The experiment's settings: one frozen, JSON-serialisable dataclass, with named presets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ExperimentConfig", "METHODS", "PRESETS", "preset"]

# The methods compared in one run (method.md §5). See sorlora/methods.py for what each one does.
METHODS = ("lora", "lori", "solora-single", "solora", "local", "oracle")
# Further baselines a run may name in `methods` (not run by default): see sorlora/methods.py.
EXTRA_METHODS = ("lora-shared-a",)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines a run's results: same data, seed, rounds and steps for every method.

    ``peers`` peers each hold one task (peer i gets ``tasks[i % len(tasks)]``); each of ``rounds`` rounds is
    ``local_steps`` AdamW steps of batch ``batch_size`` then one exchange through the hub. ``lr`` gives each method
    its learning rate (chosen on validation, never test).
    """

    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct; else an HF id or local path
    tasks: tuple[str, ...] = ("intent_recognition", "strategyqa", "bbc_news", "vitaminc_fact_verification")
    methods: tuple[str, ...] = METHODS
    peers: int = 4
    rounds: int = 3
    local_steps: int = 6
    batch_size: int = 8
    max_len: int = 96
    n_train: int = 256
    n_test: int = 40
    n_validation: int = 24  # held-out questions per task: router settings, learning rates (`sorlora tune-lr`)
    n_curve: int = 8  # test questions per task for the accuracy-vs-round curve (a subset of the test split)
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    sparsity: float = 0.25
    sparsity_allocation: str = "spectral_entropy"
    payload_dtype: str = "float32"
    lr: dict[str, float] = field(
        default_factory=lambda: {
            "lora": 3e-3,
            "lori": 3e-3,
            "solora-single": 3e-3,
            "solora": 3e-3,
            "local": 3e-3,
            "oracle": 3e-3,
            "lora-shared-a": 3e-3,
        }
    )
    degree: int = 2  # neighbours per peer in the random topology of the lora/lori baselines
    s_max: float = 0.1  # collision-rate bound of the cluster topology (pairs at sparsity 0.25 collide at ~0.06)
    router_top_k: int | None = None  # None: the paper's k = r components kept per token (see moe_router)
    router_refine: str = "routing"  # "routing" (task statistics only select), "task_stats" (Eq. 26 literally), "none"
    # with validation questions, the implicit MoE's k and refinement are chosen on them (sorlora/final_models.py)
    seed: int = 0
    eval_batch_size: int = 16
    hub: str | None = None  # None: a LocalHub under the run directory; else a Hub endpoint URL
    hub_namespace: str = "sorlora"
    pull_timeout: float = 60.0  # seconds a peer waits for a neighbour's revision before skipping it
    device: str = "auto"  # "auto": CUDA when available (e.g. a Ray actor given a GPU), else CPU; or "cpu", "cuda:0"
    engine: str = "local"  # "local" (in-process peers sharing one base model), "processes" (`sorlora peer`) or "ray"
    inter_cluster_every: int = 0  # rounds between inter-cluster exchanges of the MoE method (0: after the last only)
    threads: int | None = None
    # Ray engine only (sorlora/ray_engine.py); like engine, these never change results (not in the fingerprint).
    ray_address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": join a running cluster
    ray_cpus_per_peer: float = 1.0  # CPUs each peer actor reserves (fractional: several peers share a core)
    ray_gpus_per_peer: float = 0.0  # GPUs each peer actor reserves (0: none)
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom resources per actor, e.g. {"big": 1}
    ray_max_restarts: int = 3  # times a dead peer actor is restarted (it then resumes from its last round)
    ray_timeout: float = 3600.0  # seconds the driver waits for one phase of one peer (ray.get timeout)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS + EXTRA_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {METHODS + EXTRA_METHODS}")
        for name in ("peers", "rounds", "local_steps", "batch_size", "max_len", "n_test", "rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if not 0 < self.sparsity <= 1:
            raise ValueError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.engine not in ("local", "processes", "ray"):
            raise ValueError(f"engine must be 'local', 'processes' or 'ray', got {self.engine!r}")
        if self.ray_cpus_per_peer <= 0 or self.ray_gpus_per_peer < 0 or self.ray_timeout <= 0:
            raise ValueError(
                "ray_cpus_per_peer and ray_timeout must be > 0 and ray_gpus_per_peer >= 0, got "
                f"{self.ray_cpus_per_peer}, {self.ray_timeout}, {self.ray_gpus_per_peer}"
            )
        if self.ray_max_restarts < 0:
            raise ValueError(f"ray_max_restarts must be >= 0, got {self.ray_max_restarts}")
        missing = [m for m in self.methods if m not in self.lr]
        if missing:
            raise ValueError(f"lr has no entry for methods {missing}")

    def task_of(self, peer: int) -> str:
        """The task of peer ``peer``."""
        return self.tasks[peer % len(self.tasks)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def fingerprint(self) -> str:
        """Hash of the settings that determine results (engine, Ray placement and hub location excluded)."""
        data = {
            k: v
            for k, v in self.to_dict().items()
            if k not in ("engine", "hub", "threads", "pull_timeout", "device") and not k.startswith("ray_")
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ExperimentConfig] = {
    # `make demo`: the default comparison on the real SmolLM2, sized for 2 CPU cores in about 15 minutes.
    "demo": ExperimentConfig(),
    # A quick smoke run of the whole pipeline on the real model (a couple of minutes).
    "smoke": ExperimentConfig(
        peers=2, rounds=1, local_steps=2, n_test=8, n_curve=4, n_train=32, tasks=("intent_recognition", "strategyqa")
    ),
}


def preset(name: str) -> ExperimentConfig:
    """A named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
