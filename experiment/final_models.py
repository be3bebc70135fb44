"""The ``solora`` method's final model: every cluster's expert served together as an implicit MoE (moe_router)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from moe_router import ImplicitMoEForCausalLM
from peft_sorlora import SparseUpdate

from .evaluation import evaluate
from .tasks import Task
from .workspace import Workspace

__all__ = ["build_moe", "evaluate_moe"]


def build_moe(
    ws: Workspace,
    experts: Sequence[Sequence[SparseUpdate]],
    *,
    calibration: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    router_top_k: int | None,
) -> ImplicitMoEForCausalLM:
    """An implicit MoE over a clean copy of the workspace's base model, one expert per cluster.

    ``calibration[e][m]`` is member m of expert e's calibration batch: its task's input statistics refine that
    member's A (Eq. 26), so the frozen projections route tokens without a trained router.
    """
    base = copy.deepcopy(ws.base) if ws.model is None else copy.deepcopy(ws.model).unload()  # no adapter yet
    batches = {
        (e, m): [{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}]
        for e, members in enumerate(calibration)
        for m, batch in enumerate(members)
    }
    return ImplicitMoEForCausalLM.from_adapters(
        base,
        experts=[list(expert) for expert in experts],
        calibration=batches,
        router_top_k="rank" if router_top_k is None else router_top_k,
        check_base_model=False,
    ).eval()


def evaluate_moe(
    ws: Workspace,
    experts: Sequence[Sequence[SparseUpdate]],
    tasks: Mapping[str, Task],
    tokenizer: Any,
    *,
    calibration: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    router_top_k: int | None,
    batch_size: int,
    max_len: int,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy per task of the implicit MoE (every peer holds the same experts, so it is evaluated once)."""
    moe = build_moe(ws, experts, calibration=calibration, router_top_k=router_top_k)
    out = {}
    for name, task in tqdm(tasks.items(), desc="solora: evaluate MoE", disable=not progress, leave=False):
        out[name] = evaluate(moe, tokenizer, task, batch_size=batch_size, max_len=max_len)["accuracy"]
    return out
