"""The implicit mixture of experts over a clean copy of the workspace's base: built by a device, loaded by an evaluator."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_router import ImplicitMoEForCausalLM
from sorlora_gossip.untrusted import download_repo

from .workspace import Workspace

__all__ = ["build_moe", "load_moe"]


def build_moe(
    ws: Workspace,
    experts: Sequence[Sequence[Any]],
    *,
    calibration: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
    router_top_k: int | str | None,
    refine: str = "routing",
) -> ImplicitMoEForCausalLM:
    """An implicit MoE over a clean copy of the workspace's base model, one expert per cluster.

    ``calibration[(e, m)]`` is member m of expert e's task statistics (mean layer inputs of its own data, which it
    registered): they refine that member's A (Eq. 26), so the frozen projections route tokens without a trained
    router. ``router_top_k`` None keeps as many components per token as one member's rank (the paper's k = r).
    """
    base = ws.clean_copy()
    return ImplicitMoEForCausalLM.from_adapters(
        base,
        experts=[list(expert) for expert in experts],
        calibration={k: dict(v) for k, v in calibration.items()},
        router_top_k="rank" if router_top_k is None else router_top_k,
        refine=refine,
        check_base_model=False,
    ).eval()


def load_moe(hub: Any, repo_id: str, ws: Workspace) -> ImplicitMoEForCausalLM:
    """A peer's published implicit MoE, downloaded from ``hub`` (its config and experts, every file size-capped and
    all from the commit ``main`` is at when this is called), over a clean copy of the workspace's base."""
    sha = hub.resolve(repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        download_repo(hub, repo_id, Path(tmp), revision=sha, suffixes=(".json", ".safetensors"))
        return ImplicitMoEForCausalLM.from_pretrained(tmp, base_model=ws.clean_copy()).eval()
