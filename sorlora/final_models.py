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

__all__ = ["build_moe", "evaluate_moe", "choose_router"]


def build_moe(
    ws: Workspace,
    experts: Sequence[Sequence[SparseUpdate]],
    *,
    calibration: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    router_top_k: int | str | None,
    refine: str = "task_stats",
) -> ImplicitMoEForCausalLM:
    """An implicit MoE over a clean copy of the workspace's base model, one expert per cluster.

    ``calibration[e][m]`` is member m of expert e's calibration batch: its task's input statistics refine that
    member's A (Eq. 26), so the frozen projections route tokens without a trained router. ``router_top_k`` None
    keeps as many components per token as one member's rank (the paper's k = r).
    """
    base = copy.deepcopy(ws.base) if ws.model is None else copy.deepcopy(ws.model).unload()  # no adapter yet
    batches = {
        (e, m): [ws.on_device({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})]
        for e, members in enumerate(calibration)
        for m, batch in enumerate(members)
    }
    return ImplicitMoEForCausalLM.from_adapters(
        base,
        experts=[list(expert) for expert in experts],
        calibration=batches,
        router_top_k="rank" if router_top_k is None else router_top_k,
        refine=refine,
        check_base_model=False,
    ).eval()


def evaluate_moe(
    moe: ImplicitMoEForCausalLM,
    tasks: Mapping[str, Task],
    tokenizer: Any,
    *,
    batch_size: int,
    max_len: int,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy per task of the implicit MoE (every peer holds the same experts, so it is evaluated once)."""
    out = {}
    for name, task in tqdm(tasks.items(), desc="solora: evaluate MoE", disable=not progress, leave=False):
        out[name] = evaluate(moe, tokenizer, task, batch_size=batch_size, max_len=max_len)["accuracy"]
    return out


def choose_router(
    moe: ImplicitMoEForCausalLM,
    validation: Mapping[str, Task],
    tokenizer: Any,
    *,
    rank: int,
    batch_size: int,
    max_len: int,
) -> dict[str, Any]:
    """Pick the routing settings (k in {r, 2r, all} x refinement) with the best mean accuracy on validation tasks.

    The chosen settings are applied to ``moe``. The router itself is never trained; only this one setting is
    chosen, on held-out questions, never on test ones.
    """
    scores: dict[str, float] = {}
    best: tuple[float, str, int | str, str] | None = None
    for top_k in (rank, 2 * rank, "all"):
        for refine in ("task_stats", "routing", "none"):
            moe.set_router(top_k=top_k, refine=refine)
            acc = evaluate_moe(moe, validation, tokenizer, batch_size=batch_size, max_len=max_len)
            label = f"k={top_k},refine={refine}"
            scores[label] = sum(acc.values()) / len(acc)
            if best is None or scores[label] > best[0]:
                best = (scores[label], label, top_k, refine)
    _, label, top_k, refine = best
    moe.set_router(top_k=top_k, refine=refine)
    return {"router_top_k": top_k, "refine": refine, "chosen": label, "validation": scores}
