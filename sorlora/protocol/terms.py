"""The terms of a collaboration (``collab.json``) and a member's registration (``members/<user>/<peer>.json``).

Terms are what every member pins: the base model by a portable identity (a Hub id, or the bundled model's id plus a
weights fingerprint; never a local path), the method (adapter kind, topology, aggregation, final model), the
adapter template, the schedule, the topology's parameters, timeouts and the member limit. A registration is what a
member tells the others before the plan: its task, how much data it holds, its layer-wise sparsity budget (integer
counts, so the plan is computed on exact values) and its position for the channel model (integer millimetres).

Both are plain JSON, parsed with size caps and validated field by field; a bad one is refused with one line naming
the file and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from moe_router.routers import ROUTERS
from peft_sorlora.base_model import is_portable_base_id
from sorlora_gossip.robust import DEFAULT_STRATEGY, STRATEGIES

from ..methods.specs import ALL_METHODS, METHOD_SPECS, MethodSpec
from ..runtime.precision import PRECISIONS

__all__ = [
    "COLLAB_FORMAT",
    "REGISTRATION_FORMAT",
    "CollabTerms",
    "Registration",
    "TermsError",
    "canonical_json",
    "sha256_json",
]

COLLAB_FORMAT = "sorlora-collab/1"
REGISTRATION_FORMAT = "sorlora-registration/1"


class TermsError(ValueError):
    """Terms, a registration or a plan that cannot be used (the message names the file and the field)."""


def canonical_json(data: Any) -> bytes:
    """The canonical JSON bytes of ``data`` (sorted keys, no spaces, no NaN): equal on every machine."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256_json(data: Any) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``data``."""
    return hashlib.sha256(canonical_json(data)).hexdigest()


def _portable(base_model: str) -> str:
    if not is_portable_base_id(base_model):
        raise TermsError(f"collab.json: base_model must be a Hub id or a fingerprint name, not a path: {base_model!r}")
    return base_model


@dataclass(frozen=True)
class CollabTerms:
    """The pinned terms of one collaboration (see the module docstring); every field is part of :meth:`sha256`."""

    base_model: str = field(metadata={"help": "portable base model id (Hub id or 'weights-sha256-...'), no path"})
    base_fingerprint: str = field(metadata={"help": "peft_sorlora.base_fingerprint of the base weights"})
    method: str = field(
        default="solora", metadata={"help": f"a key of sorlora.methods.specs.METHOD_SPECS: {', '.join(ALL_METHODS)}"}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r of every adapter"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "adapted modules"})
    sparsity: float = field(default=0.25, metadata={"help": "fraction of B entries each peer trains and sends"})
    sparsity_allocation: str = field(default="spectral_entropy", metadata={"help": "layer-wise budget rule"})
    payload_dtype: str = field(default="float32", metadata={"help": "dtype of the values on the wire"})
    seed: int = field(default=0, metadata={"help": "seed of projections, batches, random topologies"})
    rounds: int = field(default=3, metadata={"help": "gossip rounds"})
    local_steps: int = field(default=6, metadata={"help": "AdamW steps per round on a peer's own data"})
    batch_size: int = field(default=8, metadata={"help": "training batch size"})
    max_len: int = field(default=96, metadata={"help": "maximum tokens of a training example"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    precision: str = field(
        default="float32",
        metadata={"help": "compute precision of training and calibration: float32 or bfloat16 (autocast; "
                  "weights, optimizer and payloads stay float32); see sorlora/runtime/precision.py"},
    )  # fmt: skip
    inter_cluster_every: int = field(
        default=0, metadata={"help": "rounds between inter-cluster exchanges (0: only after the last round)"}
    )
    s_max: float | None = field(
        default=None,
        metadata={"help": "collision-rate bound of the cluster topology; None (auto): clusters follow the tasks, the "
                  "members with the nearest registered prompt signatures (else task statistics, else layer budgets) "
                  "merge first, up to a cut and a bound chosen from the registrations "
                  "(sorlora_gossip.topology.signature_distances, auto_cut); a number: the paper's AGNES, lowest "
                  "collision rate first"},
    )  # fmt: skip
    degree: int = field(default=2, metadata={"help": "neighbours per peer in the random topology"})
    router_top_k: int | None = field(default=None, metadata={"help": "components kept per token (None: k = r)"})
    router_refine: str = field(default="routing", metadata={"help": "routing refinement of the implicit MoE"})
    router: str = field(
        default="sequence",
        metadata={"help": "router of the implicit MoE each peer publishes (moe_router.ROUTERS): sequence (per prompt, "
                  "the cluster whose members' centroids are nearest; the members' centroids travel with their "
                  "registrations), implicit (the paper's per-token top-k of the frozen projections), spectral "
                  "(data-free, from each expert's SVD), sum, average; without any valid centroids a sequence MoE "
                  "is published with implicit"},
    )  # fmt: skip
    centroid_epsilon: float | None = field(
        default=None,
        metadata={"help": "Gaussian noise on the centroids a member registers (sequence router): (epsilon, 1e-5)-DP "
                  "for one centroid (k > 1 centroids: a heuristic); None: no noise. The centroids are means of the "
                  "member's training prompts' mean input embeddings on the bare base: statistics, not text, but "
                  "they reveal what its prompts look like on average"},
    )  # fmt: skip
    max_members: int = field(default=4, metadata={"help": "registration closes when this many peers registered"})
    registration_deadline_s: float | None = field(
        default=None, metadata={"help": "seconds after creation (hub commit times) when registration closes"}
    )
    round_timeout_s: float = field(
        default=600.0,
        metadata={
            "help": "seconds a peer waits for a neighbour's round "
            "(a restarted peer reloads the base first: minutes on a loaded machine); a neighbour skipped once is "
            "not waited for again until it has pushed the round it missed, so one that left costs one timeout"
        },
    )
    publish_base: bool = field(
        default=False, metadata={"help": "ship the base weights in the collaboration's MoE repo (base/)"}
    )
    admitted: tuple[str, ...] | None = field(
        default=None, metadata={"help": "users allowed to register (None: any authenticated user)"}
    )
    aggregation: str = field(
        default=DEFAULT_STRATEGY,
        metadata={"help": f"how every average of members' updates treats them (sorlora_gossip.robust.STRATEGIES: "
                  f"{', '.join(STRATEGIES)}): mean (the plain weighted masked average, trusts everyone), clipped "
                  "(bounded weights, direction and retreat checks, per-layer norm clipping to the members' median), trimmed or "
                  "median (clipped, then a trimmed mean / median where an entry has 3+ holders); every member "
                  "rejected or clipped is recorded with peer, round and reason"},
    )  # fmt: skip
    peers_per_user: int = field(
        default=1,
        metadata={"help": "peers one user may register (a Sybil bound: one user's extra peers are refused, in the order "
                  "the hub's history added them, and take no member slot); the simulation, whose peers share one "
                  "namespace, sets it to its number of peers"},
    )  # fmt: skip

    test_share: float = field(
        default=0.1,
        metadata={"help": "share of a member's own data file held back from training (split by a seeded hash of the "
                  "prompts; a file's own split=test records and a registry task's test split are used instead): "
                  "`sorlora peer` scores its final adapter and the collaboration's MoE on it at the end; 0: none"},
    )  # fmt: skip
    base_repo: str | None = field(
        default=None,
        metadata={"help": "repo id, on the collaboration's own hub, of the pinned base as a plain transformers repo "
                  "(weights, config, tokenizer; `sorlora collab create --host-base` pushes it to <ns>/<name>-base): "
                  "the published adapters' adapter_config.json and the MoE's config name it, so they load with "
                  "only HF_ENDPOINT (+ token) set; None: they name base_model (load it from the Hub, a local copy "
                  "or the bundled model)"},
    )  # fmt: skip
    stats_epsilon: float | None = field(
        default=None,
        metadata={"help": "Gaussian noise on the task statistics a member registers (h0: the mean input of every "
                  "adapted layer over its calibration batch, what the cluster topology and the implicit MoE use): "
                  "each example's statistics clipped to sqrt(total width), averaged, noised for (epsilon, 1e-5)-DP "
                  "of one example (moe_router/privacy.py, the Gaussian mechanism the centroids use). None: the "
                  "exact token mean, from which matching pursuit recovers token ids of the batch; at 1 it recovers "
                  "no more than from random statistics, but with one calibration batch the noise also drowns the "
                  "task signal the clusters are formed from (README, trust model)"},
    )  # fmt: skip
    public: bool = field(
        default=False,
        metadata={"help": "whether the collaboration repo (terms, registrations, task statistics, centroids, plan) "
                  "is public; False: created private, read by its owner and, on hub-serve, by the users it admits "
                  "(on the Hugging Face Hub: create it in an organisation the members belong to)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        _portable(self.base_model)
        if self.base_repo is not None and not (
            isinstance(self.base_repo, str) and self.base_repo.count("/") == 1 and is_portable_base_id(self.base_repo)
        ):
            raise TermsError(f"collab.json: base_repo must be a repo id 'ns/name' or null, got {self.base_repo!r}")
        if self.method not in METHOD_SPECS:
            raise TermsError(f"collab.json: method {self.method!r} unknown; choose from {sorted(METHOD_SPECS)}")
        for name in ("rank", "rounds", "local_steps", "batch_size", "max_len", "max_members", "peers_per_user"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TermsError(f"collab.json: {name} must be a positive integer, got {value!r}")
        if not 0 < self.sparsity <= 1:
            raise TermsError(f"collab.json: sparsity must be in (0, 1], got {self.sparsity!r}")
        for name in ("lr", "round_timeout_s", "lora_alpha"):
            if not (isinstance(getattr(self, name), (int, float)) and math.isfinite(getattr(self, name))):
                raise TermsError(f"collab.json: {name} must be a finite number, got {getattr(self, name)!r}")
        if self.round_timeout_s <= 0 or self.lr <= 0:
            raise TermsError("collab.json: lr and round_timeout_s must be > 0")
        deadline = self.registration_deadline_s
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < math.inf
        ):
            raise TermsError(
                f"collab.json: registration_deadline_s must be a positive number or null, got {deadline!r}"
            )
        if self.precision not in PRECISIONS:
            raise TermsError(f"collab.json: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.aggregation not in STRATEGIES:
            raise TermsError(
                f"collab.json: aggregation must be one of {', '.join(STRATEGIES)}, got {self.aggregation!r}"
            )
        if self.router not in ROUTERS or self.router == "hard":
            raise TermsError(
                f"collab.json: router must be one of {', '.join(r for r in ROUTERS if r != 'hard')}, got {self.router!r}"
            )
        for name in ("centroid_epsilon", "stats_epsilon"):
            eps = getattr(self, name)
            if eps is not None and (
                isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf
            ):
                raise TermsError(f"collab.json: {name} must be a positive number or null, got {eps!r}")
        if not isinstance(self.public, bool):
            raise TermsError(f"collab.json: public must be true or false, got {self.public!r}")
        share = self.test_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise TermsError(f"collab.json: test_share must be a number in [0, 1), got {share!r}")
        if self.s_max is not None and (isinstance(self.s_max, bool) or not isinstance(self.s_max, (int, float))
                                       or not 0 <= self.s_max <= 1):  # fmt: skip
            raise TermsError(f"collab.json: s_max must be a number in [0, 1] or null, got {self.s_max!r}")
        if self.inter_cluster_every < 0:
            raise TermsError(f"collab.json: inter_cluster_every must be >= 0, got {self.inter_cluster_every}")

    @property
    def spec(self) -> MethodSpec:
        """The method's :class:`~sorlora.methods.specs.MethodSpec` (adapter kind, topology, aggregation, final model)."""
        return METHOD_SPECS[self.method]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["admitted"] = None if self.admitted is None else list(self.admitted)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "collab.json") -> CollabTerms:
        if not isinstance(data, dict):
            raise TermsError(f"{source}: terms must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TermsError(f"{source}: unknown terms {unknown}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("base_model", "base_fingerprint") if k not in data]
        if missing:
            raise TermsError(f"{source}: missing {missing}")
        values = dict(data)
        for key in ("target_modules", "admitted"):
            if isinstance(values.get(key), list):
                values[key] = tuple(str(v) for v in values[key])
        try:
            return cls(**values)
        except TypeError as exc:
            raise TermsError(f"{source}: {exc}") from exc

    def sha256(self) -> str:
        """The terms' hash: what a plan and every registration name to show they were made under these terms."""
        return sha256_json(self.to_dict())

    def replace(self, **changes: Any) -> CollabTerms:
        return dataclasses.replace(self, **changes)


def _int_map(value: Any, what: str, source: str) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in value.items()
    ):
        raise TermsError(f"{source}: {what} must map layer names to non-negative integers")
    return dict(sorted(value.items()))


@dataclass(frozen=True)
class Registration:
    """One member's registration: who it is and what the plan needs to know about it (see the module docstring)."""

    peer: str  # the member's peer repo id, "user/name"
    user: str
    task: str
    n_train: int
    terms_sha256: str
    position_mm: tuple[int, int] | None = None  # channel-model position estimate, integer millimetres
    kept: dict[str, int] | None = None  # SO-LoRA: B entries kept per layer (the layer-wise budget)
    sizes: dict[str, int] | None = None  # SO-LoRA: B entries per layer
    value_bytes: int | None = None  # bytes of one round's values on the wire
    software: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["format"] = REGISTRATION_FORMAT
        data["position_mm"] = None if self.position_mm is None else list(self.position_mm)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> Registration:
        """Validate a registration read from the hub (``source`` names its file in messages)."""
        if not isinstance(data, dict) or data.get("format") != REGISTRATION_FORMAT:
            raise TermsError(f"{source}: not a {REGISTRATION_FORMAT} registration")
        body = {k: v for k, v in data.items() if k != "format"}
        known = {f.name for f in dataclasses.fields(cls)}
        if set(body) - known:
            raise TermsError(f"{source}: unknown fields {sorted(set(body) - known)}")
        for key in ("peer", "user", "task", "terms_sha256"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise TermsError(f"{source}: field {key!r} must be a non-empty string")
        if body["peer"].count("/") != 1 or body["peer"].split("/")[0] != body["user"]:
            raise TermsError(f"{source}: peer {body['peer']!r} is not a repo of user {body['user']!r}")
        n_train = body.get("n_train")
        if not isinstance(n_train, int) or isinstance(n_train, bool) or n_train <= 0:
            raise TermsError(f"{source}: field 'n_train' must be a positive integer, got {n_train!r}")
        pos = body.get("position_mm")
        if pos is not None:
            if not (isinstance(pos, list) and len(pos) == 2 and all(isinstance(v, int) for v in pos)):
                raise TermsError(f"{source}: field 'position_mm' must be [x, y] integers")
            body["position_mm"] = (int(pos[0]), int(pos[1]))
        for key in ("kept", "sizes"):
            if body.get(key) is not None:
                body[key] = _int_map(body[key], key, source)
        if body.get("kept") is not None and (body.get("sizes") is None or set(body["kept"]) != set(body["sizes"])):
            raise TermsError(f"{source}: fields 'kept' and 'sizes' must name the same layers")
        vb = body.get("value_bytes")
        if vb is not None and (not isinstance(vb, int) or isinstance(vb, bool) or vb < 0):
            raise TermsError(f"{source}: field 'value_bytes' must be a non-negative integer")
        return cls(**body)
