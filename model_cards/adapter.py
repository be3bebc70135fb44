"""The card of one peer's adapter repo: what the adapter is, how it was configured and exchanged, and how to load it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from model_cards.common import (
    BASE_TAGS,
    CITATION_MARKDOWN,
    TEMPLATES_DIR,
    format_bytes,
    format_count,
    format_value,
    python_literal,
    tag_slug,
    unique,
)

__all__ = ["AdapterCardInfo", "RoundRecord", "adapter_card", "summarize_config", "ADAPTER_TEMPLATE"]

ADAPTER_TEMPLATE = TEMPLATES_DIR / "adapter_card.md"
REQUIRED_CONFIG_KEYS: tuple[str, ...] = ("r", "lora_alpha", "projection", "projection_seed", "slot", "sparsity")
OPTIONAL_CONFIG_KEYS: tuple[str, ...] = ("sparsity_allocation", "target_modules", "payload_dtype")
_LAYER_SUMMARY_KEYS: tuple[str, ...] = ("layer_sparsity_min", "layer_sparsity_mean", "layer_sparsity_max")
_CONFIG_LABELS: dict[str, str] = {
    "r": "Rank `r`",
    "lora_alpha": "`lora_alpha`",
    "projection": "Projection mode",
    "projection_seed": "Projection seed",
    "slot": "Slot",
    "sparsity": "Kept fraction of B (`sparsity`)",
    "sparsity_allocation": "Sparsity allocation",
    "target_modules": "Target modules",
    "payload_dtype": "Payload dtype",
    "layers": "Adapted layers",
    "layer_sparsity_min": "Per-layer kept fraction (min)",
    "layer_sparsity_mean": "Per-layer kept fraction (mean)",
    "layer_sparsity_max": "Per-layer kept fraction (max)",
}
MAX_ROUNDS_SHOWN = 20


@dataclass(frozen=True)
class RoundRecord:
    """What one exchange round sent: the round number, parameters and bytes transmitted, neighbours reached."""

    round: int
    params_transmitted: int
    bytes_sent: int
    neighbours: int | None = None

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ValueError(f"RoundRecord.round must be >= 0, got {self.round}.")
        for name in ("params_transmitted", "bytes_sent"):
            if getattr(self, name) < 0:
                raise ValueError(f"RoundRecord.{name} must be >= 0, got {getattr(self, name)}.")


def summarize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The SO-LoRA settings a card shows, from a config dict (e.g. ``SOLoRAConfig.to_dict()``) or a prepared summary.

    Per-layer sparsity is summarized as min/mean/max over ``layer_sparsity`` (layer key -> sparsity) when that mapping
    is given, or taken from ``layer_sparsity_min/mean/max`` keys. Raises ValueError naming missing keys.
    """
    missing = [key for key in REQUIRED_CONFIG_KEYS if config.get(key) is None]
    if missing:
        raise ValueError(f"SO-LoRA config summary lacks required key(s): {', '.join(missing)}.")
    summary: dict[str, Any] = {key: config[key] for key in REQUIRED_CONFIG_KEYS}
    summary.update({key: config[key] for key in OPTIONAL_CONFIG_KEYS if config.get(key) is not None})
    layer_sparsity = config.get("layer_sparsity")
    if layer_sparsity:
        if not isinstance(layer_sparsity, Mapping):
            raise ValueError("config['layer_sparsity'] must map layer keys to sparsity values.")
        values = [float(value) for value in layer_sparsity.values()]
        if not all(math.isfinite(value) for value in values):
            raise ValueError("config['layer_sparsity'] holds a non-finite value.")
        summary["layers"] = len(values)
        summary["layer_sparsity_min"] = min(values)
        summary["layer_sparsity_mean"] = sum(values) / len(values)
        summary["layer_sparsity_max"] = max(values)
    else:
        summary.update({key: float(config[key]) for key in _LAYER_SUMMARY_KEYS if config.get(key) is not None})
        if config.get("layers") is not None:
            summary["layers"] = int(config["layers"])
    return summary


@dataclass(frozen=True)
class AdapterCardInfo:
    """Everything an adapter card shows, as plain data: identity, peer and topology, config, rounds, metrics."""

    repo_id: str  # the repo (or local directory) the card describes; the loading snippet names it
    base_model: str  # Hub id (or local directory) of the base model
    peer_id: str | None  # None: an adapter trained outside a decentralized run (e.g. PeftModel.push_to_hub)
    task: str | None
    config: Mapping[str, Any]  # see summarize_config
    dataset: str | None = None
    cluster: int | str | None = None  # None before clustering
    neighbours: Sequence[str] = ()
    rounds: Sequence[RoundRecord] = ()
    params_updated: int | None = None  # number of trained (masked) B entries
    metrics: Mapping[str, float] = field(default_factory=dict)
    license: str | None = None
    revision: str | None = None  # the branch/tag the loading snippet names (e.g. "final"); None: the default branch
    moe_repo: str | None = None  # the collaboration's implicit MoE, which holds this adapter's cluster's expert
    base_fingerprint: str | None = None  # peft_sorlora.base_fingerprint of the base weights
    pinned_base: str | None = None  # the collaboration's pinned base id, when base_model names a hosted copy of it
    tokenizer_in_repo: bool = False  # the repo carries the base's tokenizer files (AutoTokenizer loads from it)

    def __post_init__(self) -> None:
        for name in ("repo_id", "base_model", "peer_id", "task"):
            value = getattr(self, name)
            if value is None and name in ("peer_id", "task"):
                continue
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"AdapterCardInfo.{name} must be a non-empty string, got {value!r}.")
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision.strip()):
            raise ValueError(f"AdapterCardInfo.revision must be None or a non-empty string, got {self.revision!r}.")
        if isinstance(self.neighbours, str):
            raise ValueError("AdapterCardInfo.neighbours must be a sequence of peer ids, not a string.")
        for record in self.rounds:
            if not isinstance(record, RoundRecord):
                raise ValueError(f"AdapterCardInfo.rounds must hold RoundRecord items, got {type(record).__name__}.")
        for name, value in self.metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"Metric {name!r} must be a number, got {value!r}.")

    @property
    def params_transmitted_total(self) -> int:
        """Parameters sent over all rounds so far."""
        return sum(record.params_transmitted for record in self.rounds)

    @property
    def bytes_sent_total(self) -> int:
        """Bytes sent over all rounds so far."""
        return sum(record.bytes_sent for record in self.rounds)


def _tags(info: AdapterCardInfo, *, lora_export: bool) -> list[str]:
    tags = ["peft", *BASE_TAGS]
    if lora_export:
        tags.append("lora")  # an export is plain LoRA; native SO-LoRA checkpoints must not claim to be
    if info.task:
        tags.append(tag_slug(info.task))
    if info.dataset:
        tags.append(tag_slug(info.dataset))
    return unique(tags)


def adapter_card(info: AdapterCardInfo, *, lora_export: bool = False) -> ModelCard:
    """Render the card of a peer's adapter repo; ``lora_export`` for a ``peft.save_as_lora`` export of it.

    Native SO-LoRA cards are not tagged ``lora`` (the Hub would offer plain-LoRA loading, which fails); exports are.
    """
    summary = summarize_config(info.config)
    card_data = ModelCardData(
        base_model=info.base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        license=info.license,
        datasets=[info.dataset] if info.dataset else None,
        tags=_tags(info, lora_export=lora_export),
        base_model_relation="adapter",
    )
    shown = list(info.rounds)[-MAX_ROUNDS_SHOWN:]
    rounds_rows = [
        {
            "round": record.round,
            "params": format_count(record.params_transmitted),
            "bytes": format_bytes(record.bytes_sent),
            "neighbours": "" if record.neighbours is None else record.neighbours,
        }
        for record in shown
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(ADAPTER_TEMPLATE),
        lora_export=lora_export,
        repo_id=info.repo_id,
        repo_literal=python_literal(info.repo_id),
        revision_literal=None if info.revision is None else python_literal(info.revision),
        moe_repo=info.moe_repo,
        moe_literal=None if info.moe_repo is None else python_literal(info.moe_repo),
        base_fingerprint=info.base_fingerprint,
        pinned_base=info.pinned_base,
        tokenizer_in_repo=info.tokenizer_in_repo,
        base_model_literal=python_literal(info.base_model),
        peer_id=info.peer_id,
        task=info.task,
        dataset=info.dataset,
        cluster_text="not assigned yet" if info.cluster is None else f"`{info.cluster}`",
        neighbours_text=", ".join(f"`{peer}`" for peer in info.neighbours) or "none",
        config_rows=[(_CONFIG_LABELS[key], format_value(value)) for key, value in summary.items()],
        rounds_rows=rounds_rows,
        rounds_count=len(info.rounds),
        rounds_hidden=len(shown) < len(info.rounds),
        params_updated_text="an unreported number of"
        if info.params_updated is None
        else format_count(info.params_updated),
        params_transmitted_total=format_count(info.params_transmitted_total),
        bytes_sent_total=format_bytes(info.bytes_sent_total),
        metric_rows=[(name, format_value(float(value))) for name, value in sorted(info.metrics.items())],
        citation=CITATION_MARKDOWN,
    )
