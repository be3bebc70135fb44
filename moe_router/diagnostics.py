"""Routing diagnostics: does the router send a task's prompts to the task's own cluster?

:func:`routing_diagnostics` runs prompts with known tasks through the model under its current router and reports,
per task, the cluster-selection accuracy (share of the task's prompts whose selected cluster is the expected one),
the own-expert share (:func:`moe_router.routing_shares` restricted to the task's prompts: the share of the kept
components that belong to the expected cluster), and the task x cluster confusion matrix of the selections.

A prompt's *selected cluster* is the expert that holds the most kept components over the prompt's real tokens and
all expert layers: for the ``sequence`` router with ``choose=1`` it is the chosen cluster; for per-token routers
(``implicit``) it is the cluster the router favours for that prompt.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .modeling import ImplicitMoEPreTrainedModel

__all__ = ["RoutingDiagnostics", "prompt_shares", "routing_diagnostics"]


@torch.no_grad()
def prompt_shares(
    model: ImplicitMoEPreTrainedModel,
    batch: Mapping[str, torch.Tensor],
    *,
    expert_ids: torch.Tensor | int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Per prompt, the share of its kept components in each expert (batch x E, rows sum to 1), counted over its real
    (attention-masked) tokens and every expert layer, in one forward under the model's router. ``expert_ids`` feed
    the ``hard`` router."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "inputs_embeds")}
    rows = next(iter(inputs.values())).shape[0]
    counts = torch.zeros(rows, model.num_experts, dtype=torch.float64)
    token_mask = inputs.get("attention_mask")

    def record(expert: torch.Tensor, keep: torch.Tensor, h: torch.Tensor) -> None:
        weight = keep.double()
        if weight.ndim != 3 or weight.shape[0] != rows:
            return
        if token_mask is not None and tuple(weight.shape[:-1]) == tuple(token_mask.shape):
            weight = weight * token_mask.to(weight.device).unsqueeze(-1).double()
        counts.index_add_(1, expert.cpu(), weight.sum(1).cpu())

    was_training = model.training
    model.eval()
    try:
        with model.recording(record):
            model(**inputs, expert_ids=expert_ids)
    finally:
        model.train(was_training)
    total = counts.sum(1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("a prompt kept no component: empty prompt or all-zero inputs")
    return (counts / total).float()


@dataclass
class RoutingDiagnostics:
    """Per-task routing quality of one router on labelled prompts (see :func:`routing_diagnostics`)."""

    tasks: list[Hashable]  # in first-seen order
    expected: dict[Hashable, int]  # task -> its own cluster
    accuracy: dict[Hashable, float]  # task -> share of its prompts whose selected cluster is the expected one
    own_share: dict[Hashable, float]  # task -> share of its prompts' kept components in the expected cluster
    confusion: torch.Tensor  # (tasks x experts) prompts of each task per selected cluster
    selected: list[int] = field(default_factory=list)  # per prompt, in input order
    labels: list[Hashable] = field(default_factory=list)  # per prompt, in input order
    router: str = ""

    @property
    def min_accuracy(self) -> float:
        """The worst task's cluster-selection accuracy."""
        return min(self.accuracy.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (task names as strings)."""
        return {
            "router": self.router,
            "tasks": [str(t) for t in self.tasks],
            "expected": {str(t): e for t, e in self.expected.items()},
            "accuracy": {str(t): v for t, v in self.accuracy.items()},
            "own_share": {str(t): v for t, v in self.own_share.items()},
            "confusion": self.confusion.tolist(),
        }


def routing_diagnostics(
    model: ImplicitMoEPreTrainedModel,
    examples: Iterable[tuple[Mapping[str, torch.Tensor], Sequence[Hashable]]],
    expected: Mapping[Hashable, int],
) -> RoutingDiagnostics:
    """Cluster-selection accuracy per task, own-expert share per task and the task x cluster confusion matrix.

    ``examples``: ``(batch, tasks)`` pairs, ``batch`` a dict with ``input_ids`` (and ``attention_mask``: pad
    positions are not counted), ``tasks`` the true task of each row. ``expected``: task -> the cluster (expert
    index) that should serve it. Under the ``hard`` router each row is routed to ``expected[task]``.
    """
    num_experts = model.num_experts
    bad = {t: e for t, e in expected.items() if not (isinstance(e, int) and 0 <= e < num_experts)}
    if bad:
        raise ValueError(f"expected clusters must be expert indices 0..{num_experts - 1}, got {bad}")
    order: list[Hashable] = []
    selected: list[int] = []
    labels: list[Hashable] = []
    kept: dict[Hashable, torch.Tensor] = {}
    for batch, tasks in examples:
        tasks = list(tasks)
        rows = int(batch["input_ids"].shape[0])
        if len(tasks) != rows:
            raise ValueError(f"{len(tasks)} task labels for a batch of {rows} prompts")
        missing = sorted({str(t) for t in tasks if t not in expected})
        if missing:
            raise ValueError(f"tasks {missing} have no expected cluster")
        ids = [expected[t] for t in tasks] if model.config.router == "hard" else None
        shares = prompt_shares(model, batch, expert_ids=ids)
        for row, task in enumerate(tasks):
            if task not in kept:
                order.append(task)
                kept[task] = torch.zeros(num_experts, dtype=torch.float64)
            kept[task] += shares[row].double()
            selected.append(int(shares[row].argmax()))
            labels.append(task)
    if not labels:
        raise ValueError("no prompts given")
    confusion = torch.zeros(len(order), num_experts, dtype=torch.long)
    index = {t: i for i, t in enumerate(order)}
    for task, chosen in zip(labels, selected):
        confusion[index[task], chosen] += 1
    accuracy = {t: float(confusion[index[t], expected[t]]) / float(confusion[index[t]].sum()) for t in order}
    own_share = {t: float(kept[t][expected[t]] / kept[t].sum()) for t in order}
    return RoutingDiagnostics(
        tasks=order,
        expected={t: int(expected[t]) for t in order},
        accuracy=accuracy,
        own_share=own_share,
        confusion=confusion,
        selected=selected,
        labels=labels,
        router=str(model.config.router),
    )
