"""Building an implicit MoE from SO-LoRA adapters: reading members, task statistics, assembling the expert layers.

An expert (one cluster) is a list of members; a member is one peer's SO-LoRA adapter: per layer its frozen A
(regenerated from projection/seed/slot, or read from a saved adapter) and its masked B, with scale ``alpha / r``.
Sources accepted for a member: a saved SO-LoRA adapter directory or Hub id (PEFT format, read with JSON and
safetensors only), a :class:`peft_sorlora.SparseUpdate` with structure, or a ``PeftModel`` (each SO-LoRA adapter in it
becomes one member).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from peft import PeftConfig
from safetensors.torch import load_file
from torch import nn

from peft_sorlora import SOLORA, SparseUpdate, get_sparse_update, projection_matrix

from .configuration import ImplicitMoEConfig
from .layer import LayerExperts, task_gain

__all__ = [
    "Member",
    "member_from_update",
    "read_adapter",
    "load_members",
    "task_statistics",
    "assemble_experts",
    "build_moe",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class Member:
    """One peer's adapter: layer key -> (A ``r x in``, masked B ``out x r``), its scale and a JSON description."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        """The base model the adapter was trained on, if recorded."""
        return self.description.get("base_model") or None

    @property
    def r(self) -> int:
        """The member's rank."""
        return int(self.description["r"])


def _describe(projection: str, seed: int, slot: int, r: int, alpha: float, source: str, base: str | None) -> dict:
    return {
        "projection": projection,
        "projection_seed": int(seed),
        "slot": int(slot),
        "r": int(r),
        "lora_alpha": float(alpha),
        "source": source,
        "base_model": base or None,
    }


def member_from_update(update: SparseUpdate, source: str | None = None) -> Member:
    """A member from a round-0 :class:`SparseUpdate`: A regenerated from its projection/seed/slot, B from the values."""
    if not isinstance(update, SparseUpdate):
        raise TypeError(f"expected a peft_sorlora.SparseUpdate, got {type(update).__name__}")
    if not update.has_structure:
        raise ValueError(
            "a value-only SparseUpdate cannot define an expert: pass the peer's round-0 update (with masks) or "
            "rebuild one with masks from it"
        )
    update.validate()
    meta = update.metadata
    r, seed, slot = int(meta["r"]), int(meta["projection_seed"]), int(meta["slot"])
    alpha = float(meta.get("lora_alpha", 2 * r))
    dense = update.dense_B()
    layers = {}
    for key, b in dense.items():
        out_features, rank, in_features = update.shapes[key]
        a = projection_matrix(
            projection=meta["projection"], seed=seed, slot=slot, r=rank, in_features=in_features, layer_key=key
        )
        layers[key] = (a, b)
    source = source or f"sparse_update(round={update.round}, config_hash={update.config_hash})"
    return Member(
        layers=layers,
        scale=alpha / r,
        description=_describe(meta["projection"], seed, slot, r, alpha, source, update.base_model),
    )


def read_adapter(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Member:
    """A member from a saved SO-LoRA adapter (local directory or Hub repo id): JSON config + safetensors weights."""
    source = str(path_or_id)
    path = source
    if not os.path.isdir(source):
        path = snapshot_download(
            source, revision=revision, token=token, endpoint=endpoint, allow_patterns=[CONFIG_NAME, ADAPTER_WEIGHTS]
        )
    config = PeftConfig.from_pretrained(path)
    if config.peft_type != SOLORA:
        raise ValueError(f"{source!r} holds a {config.peft_type} adapter, not an SO-LoRA one")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise ValueError(f"{source!r} has no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    tensors = load_file(weights)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("solora_A", "solora_B", "solora_mask"):
            continue
        key = module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module
        parts.setdefault(key, {})[kind] = tensor
    if not parts:
        raise ValueError(f"{path!r} holds no SO-LoRA tensors (solora_A/solora_B/solora_mask)")
    layers = {}
    for key, p in parts.items():
        if "solora_B" not in p:
            raise ValueError(f"{path!r}: layer {key!r} has no solora_B")
        b = p["solora_B"].float()
        mask = p.get("solora_mask", torch.ones_like(b, dtype=torch.bool)).bool()
        if mask.shape != b.shape:
            raise ValueError(f"{path!r}: layer {key!r} mask {tuple(mask.shape)} does not match B {tuple(b.shape)}")
        a = p.get("solora_A")
        if a is None:
            raise ValueError(f"{path!r}: layer {key!r} has no solora_A")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{path!r}: layer {key!r} A {tuple(a.shape)} and B {tuple(b.shape)} ranks differ")
        layers[key] = (a.float(), b * mask)
    return Member(
        layers=layers,
        scale=float(config.lora_alpha) / config.r,
        description=_describe(
            config.projection,
            config.projection_seed,
            config.slot,
            config.r,
            config.lora_alpha,
            source,
            config.base_model_name_or_path,
        ),
    )


def load_members(
    source: Any, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None
) -> list[Member]:
    """The members one source yields: an adapter path/id or SparseUpdate gives one; a PeftModel one per adapter."""
    if isinstance(source, SparseUpdate):
        return [member_from_update(source)]
    if isinstance(source, (str, os.PathLike)):
        return [read_adapter(source, revision=revision, token=token, endpoint=endpoint)]
    configs = getattr(source, "peft_config", None)
    if isinstance(source, nn.Module) and isinstance(configs, Mapping):
        names = [name for name, cfg in configs.items() if cfg.peft_type == SOLORA]
        if not names:
            raise ValueError("the PeftModel holds no SO-LoRA adapter")
        return [
            member_from_update(get_sparse_update(source, name, round=0), source=f"peft_model:{name}") for name in names
        ]
    raise TypeError(
        f"cannot read an expert from a {type(source).__name__}: expected an adapter directory or Hub id, a "
        "peft_sorlora.SparseUpdate or a PeftModel with SO-LoRA adapters"
    )


def _is_batch(value: Any) -> bool:
    return isinstance(value, Mapping) and "input_ids" in value


@torch.no_grad()
def task_statistics(
    base_model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], layer_keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """h0 per layer: the mean input of each layer over the real (attention-masked) tokens of ``batches``.

    Computed on the base model alone (no adapters), so every member's statistics are measured the same way.
    """
    modules = dict(base_model.named_modules())
    keys = list(layer_keys)
    missing = [k for k in keys if k not in modules]
    if missing:
        raise ValueError(f"layers {missing[:5]} do not exist in the base model")
    sums = {k: None for k in keys}
    counts = {k: 0.0 for k in keys}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().float()
            mask = current["mask"]
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                weights = mask.to(x.device).float().unsqueeze(-1)
                total, count = (x * weights).reshape(-1, x.shape[-1]).sum(0), float(weights.sum())
            else:
                total, count = x.reshape(-1, x.shape[-1]).sum(0), float(x[..., 0].numel())
            sums[key] = total.cpu() if sums[key] is None else sums[key] + total.cpu()
            counts[key] += count

        return hook

    handles = [modules[k].register_forward_hook(hook_for(k)) for k in keys]
    was_training = base_model.training
    base_model.eval()
    try:
        seen = 0
        for batch in [batches] if _is_batch(batches) else batches:
            if not _is_batch(batch):
                raise ValueError("calibration batches must be dicts with input_ids (and optionally attention_mask)")
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            current["mask"] = inputs.get("attention_mask")
            base_model(**inputs)
            seen += 1
        if not seen:
            raise ValueError("calibration data is empty: give at least one batch")
    finally:
        for handle in handles:
            handle.remove()
        base_model.train(was_training)
    return {k: sums[k] / max(counts[k], 1.0) for k in keys}


def _member_stats(
    calibration: Any, groups: list[list[Member]], base_model: nn.Module
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Resolve ``calibration`` to h0 per (expert, member); sources shared by several members are run once."""
    if isinstance(calibration, Mapping) and not _is_batch(calibration):
        lookup = dict(calibration)
    elif isinstance(calibration, Sequence) and not isinstance(calibration, (str, bytes)):
        if len(calibration) != len(groups):
            raise ValueError(f"calibration has {len(calibration)} entries for {len(groups)} experts")
        lookup = dict(enumerate(calibration))
    else:
        raise TypeError(
            "calibration must map expert index (or (expert, member)) to batches or h0 tensors, or be a list"
        )
    unknown = [k for k in lookup if not (k in range(len(groups)) or (isinstance(k, tuple) and len(k) == 2))]
    if unknown:
        raise ValueError(f"calibration keys {unknown[:5]} are not expert indices (0..{len(groups) - 1}) or pairs")
    computed: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for e, members in enumerate(groups):
        for m, member in enumerate(members):
            source = lookup.get((e, m), lookup.get(e))
            if source is None:
                continue
            if isinstance(source, Mapping) and not _is_batch(source):
                missing = [k for k in member.layers if k not in source]
                if missing:
                    raise ValueError(f"precomputed h0 for expert {e} member {m} lacks layers {missing[:5]}")
                out[(e, m)] = {k: torch.as_tensor(source[k]).float() for k in member.layers}
                continue
            if id(source) not in computed:
                keys = sorted({k for group in groups for mem in group for k in mem.layers})
                computed[id(source)] = task_statistics(base_model, source, keys)
            out[(e, m)] = computed[id(source)]
    return out


def assemble_experts(
    groups: list[list[Member]], stats: Mapping[tuple[int, int], Mapping[str, torch.Tensor]] | None = None
) -> dict[str, LayerExperts]:
    """Concatenate every member's components per layer (expert and member index per component, task gains)."""
    stats = stats or {}
    flat = [(e, m, member) for e, members in enumerate(groups) for m, member in enumerate(members)]
    keys = sorted({k for _, _, member in flat for k in member.layers})
    result = {}
    for key in keys:
        shapes = {
            (b.shape[0], a.shape[1]) for _, _, member in flat if key in member.layers for a, b in [member.layers[key]]
        }
        if len(shapes) != 1:
            raise ValueError(f"layer {key!r}: members disagree on the (out, in) shape: {sorted(shapes)}")
        (out_features, in_features) = shapes.pop()
        a_parts, b_parts, scales, experts, members, gains = [], [], [], [], [], []
        for g, (e, m, member) in enumerate(flat):
            h0 = stats.get((e, m), {}).get(key)
            if h0 is not None and h0.numel() != in_features:
                raise ValueError(
                    f"layer {key!r}: h0 of expert {e} member {m} has {h0.numel()} entries, not {in_features}"
                )
            gains.append(task_gain(h0) if h0 is not None else torch.ones(in_features))
            if key not in member.layers:
                continue
            a, b = member.layers[key]
            r = a.shape[0]
            a_parts.append(a.float())
            b_parts.append(b.float())
            scales.append(torch.full((r,), member.scale))
            experts.append(torch.full((r,), e, dtype=torch.long))
            members.append(torch.full((r,), g, dtype=torch.long))
        result[key] = LayerExperts(
            A=torch.cat(a_parts),
            B=torch.cat(b_parts, dim=1),
            scale=torch.cat(scales),
            expert=torch.cat(experts),
            member=torch.cat(members),
            gain=torch.stack(gains),
        )
    return result


def _groups_from(adapters: Any, experts: Any) -> tuple[list[Any], list[str] | None]:
    if (adapters is None) == (experts is None):
        raise ValueError(
            "give exactly one of adapters= (one expert per item) or experts= (a list of members per expert)"
        )
    names = None
    items = experts if experts is not None else adapters
    if isinstance(items, Mapping):
        names, items = [str(k) for k in items], list(items.values())
    if isinstance(items, (str, os.PathLike, SparseUpdate)) or not isinstance(items, Iterable):
        raise TypeError("adapters/experts must be a list (or a mapping name -> members)")
    groups = []
    for item in items:
        if isinstance(item, (list, tuple)):
            groups.append(list(item))
        elif experts is not None and isinstance(item, Iterable) and not isinstance(item, (str, os.PathLike)):
            groups.append(list(item))
        else:
            groups.append([item])
    if not groups or any(not g for g in groups):
        raise ValueError("every expert needs at least one member")
    return groups, names


def build_moe(
    cls: type,
    base_model: nn.Module | str,
    adapters: Any = None,
    *,
    experts: Any = None,
    calibration: Any = None,
    router_top_k: int | str | None = "rank",
    routing: str = "implicit",
    refine: str | None = None,
    router: str | None = None,
    router_options: Mapping[str, Mapping[str, Any]] | None = None,
    centroids: Any = None,
    expert_names: Sequence[str] | None = None,
    check_base_model: bool = True,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
):
    """Build ``cls`` (an implicit-MoE model class) over ``base_model`` from SO-LoRA adapters; one expert per group.

        ``adapters=[a, b]``: each item one expert (an item that is a list groups several members into one expert);
        ``experts=[[upd_a, upd_b], [upd_c]]`` or ``{"cluster-0": [...], ...}``: members per expert (a gossip run's
        result: one expert per cluster). ``calibration``: expert index, or ``(expert, member)``, -> batches (dicts with
        ``input_ids``/``attention_mask``) or precomputed h0 (layer key -> tensor); a list aligned with the experts also
        works. ``refine`` defaults to ``"routing"`` when calibration is given (the best-measured setting: the task
    statistics choose the kept components, their values stay as trained; ``"task_stats"`` answered worst on the
    README's validation questions), else ``"none"``. ``router_top_k``:
        ``"rank"`` (default) keeps as many components per token as one member's rank, an int that many, None/``"all"``
        every component. ``revision``/``token``/``endpoint`` apply to adapters given as Hub ids.
        ``router`` (or its old name ``routing``): a name of :data:`moe_router.routers.ROUTERS`; ``router_options``:
        router name -> options (e.g. ``{"sequence": {"choose": 1, "pool_layer": "embeddings"}}``); ``centroids``:
        per expert a ``k_e x d`` tensor of the members' centroids (:func:`moe_router.centroids.sequence_centroids`,
        concatenated over an expert's members), needed by the ``sequence`` router, saved with the experts.
    """
    if isinstance(base_model, (str, os.PathLike)):
        base_model = getattr(transformers, cls.base_auto_class).from_pretrained(str(base_model))
    sources, names = _groups_from(adapters, experts)
    groups = [
        [m for source in group for m in load_members(source, revision=revision, token=token, endpoint=endpoint)]
        for group in sources
    ]
    base_name = getattr(base_model.config, "_name_or_path", None) or None
    if check_base_model and base_name:
        for e, group in enumerate(groups):
            for member in group:
                if member.base_model and member.base_model != base_name:
                    raise ValueError(
                        f"expert {e} ({member.description['source']}) was trained on base model "
                        f"{member.base_model!r}, not {base_name!r} (pass check_base_model=False if they are the same)"
                    )
    refine = refine or ("routing" if calibration is not None else "none")
    if refine in ("task_stats", "routing") and calibration is None:
        raise ValueError(f"refine={refine!r} needs calibration= (task batches or h0 per expert)")
    stats = _member_stats(calibration, groups, base_model) if calibration is not None else {}
    if refine in ("task_stats", "routing"):
        missing = [(e, m) for e, group in enumerate(groups) for m in range(len(group)) if (e, m) not in stats]
        if missing:
            raise ValueError(f"refine={refine!r} but no calibration for (expert, member) {missing[:5]}")
    if router_top_k == "rank":
        router_top_k = max(member.r for group in groups for member in group)
    if expert_names is not None and len(expert_names) != len(groups):
        raise ValueError(f"{len(expert_names)} expert names for {len(groups)} experts")
    names = list(expert_names) if expert_names is not None else names or [f"expert_{e}" for e in range(len(groups))]
    layer_experts = assemble_experts(groups, stats)
    config = ImplicitMoEConfig(
        base_model_name_or_path=base_name,
        base_model_type=getattr(base_model.config, "model_type", None),
        experts=[
            {
                "name": name,
                "members": [dict(m.description, refined=(e, i) in stats) for i, m in enumerate(group)],
            }
            for e, (name, group) in enumerate(zip(names, groups))
        ],
        router_top_k=router_top_k,
        router=router or routing,
        router_options=router_options,
        refine=refine,
    )
    if centroids is None:
        return cls(config, base_model=base_model, experts=layer_experts)
    active = config.router
    config.router = config.routing = "implicit"  # attach the centroids first, then switch to the router asked for
    model = cls(config, base_model=base_model, experts=layer_experts)
    model.set_centroids(centroids)
    model.set_router(router=active)
    return model
