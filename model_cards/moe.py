"""The card of the merged implicit-MoE repo: experts per cluster, routing, the experiment's results and costs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from model_cards.common import (
    ARXIV_ID,
    BASE_TAGS,
    CITATION_MARKDOWN,
    TEMPLATES_DIR,
    format_count,
    format_value,
    python_literal,
    tag_slug,
    unique,
)

__all__ = ["ExpertInfo", "MoECardInfo", "moe_card", "MOE_TEMPLATE"]

MOE_TEMPLATE = TEMPLATES_DIR / "moe_card.md"


@dataclass(frozen=True)
class ExpertInfo:
    """One expert of the merged model: the cluster it comes from, that cluster's peers and their tasks."""

    cluster: int | str
    peers: Sequence[str]
    tasks: Sequence[str]

    def __post_init__(self) -> None:
        if isinstance(self.peers, str) or isinstance(self.tasks, str):
            raise ValueError(f"Expert {self.cluster!r}: peers and tasks must be sequences of names, not strings.")
        if not self.peers:
            raise ValueError(f"Expert {self.cluster!r} has no peers.")


@dataclass(frozen=True)
class MoECardInfo:
    """Everything the merged-model card shows, as plain data.

    ``results`` maps task -> method -> metric value (the experiment's table); ``method`` names the column that is this
    model, which becomes the card's ``model-index``. Empty ``results`` (a model saved before evaluation) give a card
    without ``model-index`` whose results section says so. ``communication`` maps method -> quantity -> total.
    """

    repo_id: str
    base_model: str
    experts: Sequence[ExpertInfo]
    router_top_k: int | None  # components kept per token; None keeps all
    refinement: bool | str
    results: Mapping[str, Mapping[str, float]]
    method: str = "proposed"
    metric: str = "accuracy"
    test_size: Mapping[str, int] = field(default_factory=dict)  # task -> number of test examples
    communication: Mapping[str, Mapping[str, int | float]] = field(default_factory=dict)
    router_settings: Mapping[str, Any] = field(default_factory=dict)  # further routing settings to show
    dataset_ids: Mapping[str, str] = field(default_factory=dict)  # task -> dataset id for model-index (default: task)
    task_type: str = "multiple-choice"  # Hub task id used in model-index
    base_in_repo: bool = False  # True when the repo also holds the base model's weights
    base_fingerprint: str | None = None  # peft_sorlora.base_fingerprint of the base weights (config.base_fingerprint)
    pinned_base: str | None = None  # the collaboration's pinned base id, when base_model names a hosted copy of it
    tokenizer_in_repo: bool = False  # the repo carries the base's tokenizer files (AutoTokenizer loads from it)
    license: str | None = None

    def __post_init__(self) -> None:
        for name in ("repo_id", "base_model", "method", "metric", "task_type"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"MoECardInfo.{name} must be a non-empty string, got {value!r}.")
        if not self.experts:
            raise ValueError("MoECardInfo.experts is empty: a merged model needs at least one expert.")
        clusters = [expert.cluster for expert in self.experts]
        if len(set(clusters)) != len(clusters):
            raise ValueError(f"MoECardInfo.experts repeats a cluster: {clusters}.")
        if self.router_top_k is not None and (not isinstance(self.router_top_k, int) or self.router_top_k < 1):
            raise ValueError(f"MoECardInfo.router_top_k must be a positive integer or None, got {self.router_top_k!r}.")
        for task, row in self.results.items():
            for method, value in row.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"Result for task {task!r}, method {method!r} must be a finite number: {value!r}.")
        if self.results and not any(self.method in row for row in self.results.values()):
            raise ValueError(f"MoECardInfo.method {self.method!r} has no result for any task.")
        unknown = set(self.test_size) - set(self.results)
        if unknown:
            raise ValueError(f"MoECardInfo.test_size names tasks without results: {sorted(unknown)}.")

    @property
    def methods(self) -> list[str]:
        """Methods of the results table, in first-seen order."""
        return unique(method for row in self.results.values() for method in row)

    @property
    def tasks(self) -> list[str]:
        """Tasks the experts were trained on, in first-seen order."""
        return unique(task for expert in self.experts for task in expert.tasks)


def _eval_results(info: MoECardInfo) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=info.task_type,
            dataset_type=info.dataset_ids.get(task, task),
            dataset_name=task,
            dataset_split="test",
            metric_type=info.metric,
            metric_value=float(row[info.method]),
        )
        for task, row in info.results.items()
        if info.method in row
    ]


def _mean(values: Sequence[float]) -> str:
    return format_value(sum(values) / len(values))


def _count_cell(value: int | float) -> str:
    return format_count(value) if isinstance(value, int) else format_value(float(value))


def moe_card(info: MoECardInfo) -> ModelCard:
    """Render the card of the merged implicit-MoE repo, with the model's results as ``model-index`` eval results."""
    methods = info.methods
    model_name = info.repo_id.rstrip("/").rsplit("/", 1)[-1]
    card_data = ModelCardData(
        base_model=info.base_model,
        # Experts over a base the repo references by id: an adapter of it; with the base weights inside, a fine-tune.
        base_model_relation="finetune" if info.base_in_repo else "adapter",
        library_name="transformers",
        pipeline_tag="text-generation",
        license=info.license,
        tags=unique(["mixture-of-experts", *BASE_TAGS, *(tag_slug(task) for task in info.tasks)]),
        metrics=[info.metric] if info.results else None,
        model_name=model_name,
        eval_results=_eval_results(info) or None,
    )
    results_rows = [
        {
            "task": task,
            "n": info.test_size.get(task, ""),
            "cells": [format_value(float(row[m])) if m in row else "" for m in methods],
        }
        for task, row in info.results.items()
    ]
    # An average over a subset of tasks would not compare with the others: only methods with every task get one.
    average_cells = [
        _mean([float(row[m]) for row in info.results.values()])
        if all(m in row for row in info.results.values())
        else ""
        for m in methods
    ]
    communication_columns = unique(key for totals in info.communication.values() for key in totals)
    communication_rows = [
        {"method": method, "cells": [_count_cell(totals[c]) if c in totals else "" for c in communication_columns]}
        for method, totals in info.communication.items()
    ]
    top_k = "all components" if info.router_top_k is None else info.router_top_k
    router_rows = [("`router_top_k`", top_k), ("Task-aware refinement of A", format_value(info.refinement))]
    router_rows += [(f"`{name}`", format_value(value)) for name, value in info.router_settings.items()]
    return ModelCard.from_template(
        card_data,
        template_path=str(MOE_TEMPLATE),
        repo_literal=python_literal(info.repo_id),
        base_in_repo=info.base_in_repo,
        base_model=info.base_model,
        base_fingerprint=info.base_fingerprint,
        pinned_base=info.pinned_base,
        tokenizer_in_repo=info.tokenizer_in_repo,
        arxiv_id=ARXIV_ID,
        router_top_k=info.router_top_k,
        refined=info.refinement not in (False, None, "", "none"),
        peer_count=len(unique(peer for expert in info.experts for peer in expert.peers)),
        tasks_text=", ".join(info.tasks) or "not reported",
        experts_rows=[
            {
                "cluster": expert.cluster,
                "peers": ", ".join(f"`{peer}`" for peer in expert.peers),
                "tasks": ", ".join(unique(expert.tasks)),
            }
            for expert in info.experts
        ],
        router_rows=router_rows,
        method=info.method,
        metric_name=info.metric,
        methods=methods,
        test_size_shown=bool(info.test_size),
        results_rows=results_rows,
        average_cells=average_cells,
        communication_columns=communication_columns,
        communication_rows=communication_rows,
        citation=CITATION_MARKDOWN,
    )
