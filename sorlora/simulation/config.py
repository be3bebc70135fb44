"""The experiment's settings: one frozen, JSON-serialisable dataclass, with named presets.

Every setting is documented where it is defined (``field(metadata={"help": ...})``, as ``SOLoRAConfig`` does) and
typed; :func:`settings_help` renders them for ``sorlora run --help`` and :func:`apply_settings` turns
``--set KEY=VALUE`` strings into a checked config. A value of the wrong type is refused with a :class:`ConfigError`
(a ``ValueError``) naming the setting, the expected type and what to write instead, before any model is loaded.

Value syntax of ``--set`` (by the setting's type): integers and floats as numbers; strings as they are; lists as a
JSON list or comma-separated (``tasks=strategyqa`` is one task, ``tasks=a,b`` two); ``None`` as ``none``/``null``;
``lr`` as one number (every method's learning rate) or a JSON object of methods (only those methods change).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..fields import fields_help, type_name
from ..methods.specs import METHODS, method_names

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "PRESETS",
    "apply_settings",
    "parse_setting",
    "preset",
    "settings_help",
]


class ConfigError(ValueError):
    """A setting has a wrong name, type or value; the message says which and what to write instead."""


def _setting(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING, **meta: Any):  # noqa: A002
    """A dataclass field with its documentation (``metadata["help"]``) and optional extra metadata."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines a run's results: same data, seed, rounds and steps for every method.

    ``peers`` peers each hold one task (peer i gets ``tasks[i % len(tasks)]``); each of ``rounds`` rounds is
    ``local_steps`` AdamW steps of batch ``batch_size`` then one exchange through the hub. ``lr`` gives each method
    its learning rate (chosen on validation, never test). Each field's ``metadata["help"]`` documents it.
    """

    model: str | None = _setting(
        None, help="base model: none = the bundled SmolLM2-135M-Instruct; else a Hub id or a local folder"
    )
    tasks: tuple[str, ...] = _setting(
        # the four strongest of the pilot's kept tasks (8 x 4 steps, 2026-12-06; README "Tasks that carry signal"):
        # gains of +45.0, +43.3, +41.7 and +35.0 points over the base; the demo and study presets use them
        ("rotten_tomatoes", "review_or_plot", "word_polarity", "virtue_or_vice"),
        help="tasks, one per peer in turn: registered names (sorlora/data/registry.py), synthetic-<word>, or JSONL/CSV files",
    )
    methods: tuple[str, ...] = _setting(
        METHODS, help=f"methods to compare, any of {', '.join(method_names())} (sorlora/methods/specs.py)"
    )
    peers: int = _setting(4, help="number of peers; peer i trains on tasks[i % len(tasks)]")
    rounds: int = _setting(3, help="communication rounds (local training, then one exchange through the hub)")
    local_steps: int = _setting(6, help="AdamW steps per peer and round")
    batch_size: int = _setting(8, help="training examples per step")
    max_len: int = _setting(96, help="maximum tokens of one training example (prompt + answer)")
    n_train: int = _setting(256, help="training examples per task (shared out among the peers holding it)")
    n_test: int = _setting(40, help="test questions per task")
    n_validation: int = _setting(
        24, help="held-out questions per task: router settings, learning rates (sorlora tune-lr); 0: none"
    )
    n_curve: int = _setting(8, help="test questions per task for the accuracy-vs-round curve (a subset of test)")
    score_members: Literal["all", "dealt"] = _setting(
        "all",
        help="per-peer final models (lora, lori, local): all = every member's model answers every test question "
        "(the paper: each device on every task); dealt = each task's questions are dealt round-robin to the "
        "members and each is answered by one: the same expected mean over members at 1/peers of the scoring "
        "cost, with the members' spread added to the question noise",
    )
    rank: int = _setting(8, help="adapter rank r")
    lora_alpha: float = _setting(16.0, help="adapter scaling alpha (the update is scaled by alpha / r)")
    target_modules: tuple[str, ...] = _setting(("q_proj", "v_proj"), help="module names that get an adapter")
    sparsity: float = _setting(0.25, help="fraction of B's entries each peer trains and sends, in (0, 1]")
    sparsity_allocation: Literal["uniform", "spectral_entropy"] = _setting(
        "spectral_entropy", help="how the sparsity budget is spread over layers"
    )
    payload_dtype: Literal["float32", "float16", "bfloat16"] = _setting(
        "float32", help="dtype of the values in exchanged payloads"
    )
    precision: Literal["float32", "bfloat16"] = _setting(
        "float32",
        help="compute precision of training, calibration and evaluation: float32, or bfloat16 mixed precision "
        "(autocast; weights, optimizer state and payloads stay float32; ~1.5-2x faster where the CPU or GPU "
        "has bfloat16 units, slow where it has not); see sorlora/runtime/precision.py",
    )
    lr: dict[str, float] = _setting(
        help="learning rate per method: one number sets every method's, a JSON object only the methods it names",
        factory=lambda: {m: 3e-3 for m in method_names()},
        per_method=True,
    )
    degree: int = _setting(2, help="neighbours per peer in the random topology of the lora/lori baselines")
    s_max: float | None = _setting(
        None,
        help="collision-rate bound of the cluster topology (pairs at sparsity 0.25 collide at ~0.06); none (auto): "
        "clusters follow the tasks: the peers with the nearest registered prompt signatures (else task statistics, "
        "else layer budgets) merge first, and the cut and the bound are chosen from the registrations",
    )
    router_top_k: int | None = _setting(
        None, help="components kept per token by the implicit MoE router; none: the paper's k = r"
    )
    router_refine: Literal["routing", "task_stats", "none"] = _setting(
        "routing",
        help="MoE refinement: routing (task statistics only select), task_stats (Eq. 26 literally), none; "
        "with validation questions, k and refinement are chosen on them",
    )
    router: Literal["sequence", "implicit", "spectral", "sum", "average"] = _setting(
        "sequence",
        help="router of the implicit MoE the peers publish (moe_router.ROUTERS): sequence (each prompt picks the "
        "cluster whose members' centroids of pooled hidden states are nearest; chosen at prefill, kept while "
        "decoding), implicit (the paper's per-token top-k of the frozen projections), spectral (data-free, SVD of "
        "each expert), sum, average; the evaluator also scores the same weights under every other router",
    )
    centroid_epsilon: float | None = _setting(
        None,
        help="Gaussian noise (epsilon, delta=1e-5) on the centroids each member registers for the sequence router; "
        "none: exact centroids (means of its training prompts' mean input embeddings on the bare base)",
    )
    aggregation: Literal["mean", "clipped", "trimmed", "median"] = _setting(
        "clipped",
        help="how peers average each other's updates (sorlora_gossip.robust.STRATEGIES): clipped (bounded "
        "weights, direction check, per-layer norm clipping; rejections recorded), trimmed, median, or mean "
        "(the plain masked average, the behaviour before issue 22)",
    )
    seed: int = _setting(0, help="seed of data splits, projections and training")
    eval_batch_size: int = _setting(16, help="questions per evaluation batch")
    hub: str | None = _setting(None, help="none: a LocalHub under the run directory; else an http(s):// Hub endpoint")
    hub_namespace: str = _setting("sorlora", help="owner of the run's peer repos on the hub")
    pull_timeout: float = _setting(60.0, help="seconds a peer waits for a neighbour's revision before skipping it")
    device: str = _setting("auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    engine: Literal["local", "processes", "ray"] = _setting(
        "local",
        help="local (in-process peers sharing one base model), processes (one `sorlora peer` process per peer) "
        "or ray (one Ray actor per peer)",
    )
    inter_cluster_every: int = _setting(
        0, help="rounds between inter-cluster exchanges of the MoE method (0: after the last round only)"
    )
    threads: int | None = _setting(None, help="torch CPU threads; none: torch's default")
    # Ray engine only (sorlora/simulation/engines/ray.py); like engine, these never change results (not in the fingerprint).
    ray_address: str | None = _setting(
        None, help="Ray engine: none starts a local Ray; auto or ray://host:10001 joins a running cluster"
    )
    ray_cpus_per_peer: float = _setting(
        1.0, help="Ray engine: CPUs each peer actor reserves (fractional: several peers share a core)"
    )
    ray_gpus_per_peer: float = _setting(0.0, help="Ray engine: GPUs each peer actor reserves (0: none)")
    ray_resources: dict[str, float] = _setting(
        help='Ray engine: custom resources per actor, a JSON object, e.g. {"big": 1}', factory=dict
    )
    ray_max_restarts: int = _setting(
        3, help="Ray engine: times a dead peer actor is restarted (it then resumes from its last round)"
    )
    ray_timeout: float = _setting(3600.0, help="Ray engine: seconds the driver waits for one phase of one peer")

    def __post_init__(self) -> None:
        hints = _field_types()
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f.name, hints[f.name], getattr(self, f.name)))
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(method_names())}")
        for name in ("peers", "rounds", "local_steps", "batch_size", "max_len", "n_train", "n_test", "n_curve", "rank"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("n_validation", "seed", "inter_cluster_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batch_size <= 0 or self.degree <= 0 or self.lora_alpha <= 0 or self.pull_timeout <= 0:
            raise ConfigError("eval_batch_size, degree, lora_alpha and pull_timeout must be > 0")
        if self.router_top_k is not None and self.router_top_k <= 0:
            raise ConfigError(f"router_top_k must be > 0 or none, got {self.router_top_k}")
        if self.centroid_epsilon is not None and self.centroid_epsilon <= 0:
            raise ConfigError(f"centroid_epsilon must be > 0 or none, got {self.centroid_epsilon}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads must be > 0 or none, got {self.threads}")
        if not self.tasks or not self.methods or not self.target_modules:
            raise ConfigError("tasks, methods and target_modules must each name at least one item")
        if not 0 < self.sparsity <= 1:
            raise ConfigError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.s_max is not None and not 0 < self.s_max <= 1:
            raise ConfigError(f"s_max must be in (0, 1], got {self.s_max}")
        if self.hub is not None and not self.hub.startswith(("http://", "https://")):
            raise ConfigError(
                f"hub must be an http(s):// endpoint, got {self.hub!r} (leave it unset for a LocalHub in the run dir)"
            )
        if self.device not in ("auto", "cpu", "cuda", "mps") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.ray_cpus_per_peer <= 0 or self.ray_gpus_per_peer < 0 or self.ray_timeout <= 0:
            raise ConfigError(
                "ray_cpus_per_peer and ray_timeout must be > 0 and ray_gpus_per_peer >= 0, got "
                f"{self.ray_cpus_per_peer}, {self.ray_timeout}, {self.ray_gpus_per_peer}"
            )
        if self.ray_max_restarts < 0:
            raise ConfigError(f"ray_max_restarts must be >= 0, got {self.ray_max_restarts}")
        missing = [m for m in self.methods if m not in self.lr]
        if missing:
            raise ConfigError(f"lr has no entry for methods {missing}")
        if any(v <= 0 for v in self.lr.values()):
            raise ConfigError(f"every learning rate must be > 0, got lr={self.lr}")

    def task_of(self, peer: int) -> str:
        """The task of peer ``peer``."""
        return self.tasks[peer % len(self.tasks)]

    def eval_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`sorlora.evaluation.scoring.evaluate` these settings give."""
        return {"batch_size": self.eval_batch_size, "max_len": self.max_len, "precision": self.precision}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """A config from a JSON-style mapping (lists become tuples); unknown keys are refused."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object of settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentConfig:
        """A config from a JSON file (see :meth:`from_dict`)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON ({exc})") from None
        return cls.from_dict(data)

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


# ---------------------------------------------------------------- types: checking, parsing, documenting


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ExperimentConfig)


def _checked(name: str, hint: Any, value: Any) -> Any:
    """``value`` as type ``hint`` (lists to tuples, ints to floats), or a :class:`ConfigError` naming ``name``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong() -> ConfigError:
        return ConfigError(f"{name} must be {type_name(hint)}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _checked(name, inner[0], value) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise wrong()
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise wrong()
        return tuple(_checked(name, args[0], v) for v in value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise wrong()
        return {k: _checked(f"{name}[{k!r}]", args[1], v) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    return value


def _parse_text(hint: Any, text: str) -> Any:
    """The Python value of a ``--set`` text for a field of type ``hint`` (checked afterwards by :func:`_checked`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if hint is str or origin is Literal:
        return value if isinstance(value, str) else text
    if origin is tuple and not isinstance(value, list):
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def parse_setting(cfg: ExperimentConfig, item: str) -> tuple[str, Any]:
    """``(key, value)`` of one ``--set KEY=VALUE`` string, typed by the field ``KEY`` of ``cfg`` (see module doc)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set rounds=5)")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields:
        raise ConfigError(f"unknown setting {key!r}; see `sorlora run --help` for the settings")
    hint = _field_types()[key]
    value = _parse_text(hint, text)
    if fields[key].metadata.get("per_method"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {m: value for m in getattr(cfg, key)}
        elif isinstance(value, dict):
            unknown = [m for m in value if m not in method_names()]
            if unknown:
                raise ConfigError(f"{key} names unknown methods {unknown}; choose from {', '.join(method_names())}")
            value = {**getattr(cfg, key), **value}
        else:
            raise ConfigError(
                f"{key} must be one number or a JSON object of methods, e.g. {key}=0.01 or {key}='{{\"solora\": 0.01}}'"
            )
    return key, _checked(key, hint, value)


def apply_settings(cfg: ExperimentConfig, items: typing.Sequence[str]) -> ExperimentConfig:
    """``cfg`` with every ``--set KEY=VALUE`` of ``items`` applied in order, checked (:class:`ConfigError`)."""
    for item in items:
        key, value = parse_setting(cfg, item)
        cfg = cfg.replace(**{key: value})
    return cfg


def settings_help() -> str:
    """Every setting with its type, default and help, one per line (the epilog of ``sorlora run --help``)."""
    return fields_help(ExperimentConfig)


PRESETS: dict[str, ExperimentConfig] = {
    # `make demo`: the default comparison on the real SmolLM2 on 2 CPU cores, sized for 20 minutes: 3 rounds x 4
    # steps, 32 test and 16 validation questions per task (3 x 6 steps, 40 and 24 took about 30 min alone), at
    # bfloat16 mixed precision: about 1.5x faster training, 2x faster scoring on CPUs with bfloat16 units such as
    # this project's Xeon; accuracy within noise of float32 (lora 57.6 vs 57.9 on 160 questions).
    "demo": ExperimentConfig(precision="bfloat16", local_steps=4, n_test=32, n_validation=16),
    # A small run of the whole pipeline on the real model, every method: not "a couple of minutes" - measured 13 min
    # 22 s wall (782 s CPU) on a shared 2-core machine (over 8 min reported on an unshared one); see README.
    "smoke": ExperimentConfig(
        peers=2,
        rounds=1,
        local_steps=2,
        n_test=8,
        n_curve=4,
        n_train=32,
        tasks=("rotten_tomatoes", "review_or_plot"),
    ),
}


def preset(name: str) -> ExperimentConfig:
    """A named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
