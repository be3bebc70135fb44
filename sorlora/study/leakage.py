"""What a member's published task statistics leak: the matching-pursuit attack on its layer-0 h0 (issue 22).

At layer 0 the input of an adapted projection for one token depends on that token alone (the normed embedding), so
the mean input ``h0`` over a batch's tokens is a non-negative combination of the vocabulary's per-token inputs (the
token frequencies). Non-negative matching pursuit (NNMP) over that dictionary recovers the support: which token ids
the private batch held. :func:`leakage` counts the **content tokens** recovered (tokens of the batch that are not in
its prompt template, which an attacker knows) from the statistics a member ships (``released_statistics`` with the
terms' ``stats_epsilon``) against random statistics of the same shape and norm: when the shipped ones recover no
more than random ones, the statistics leak nothing the attack can use.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moe_router.privacy import released_statistics

__all__ = ["layer0_dictionary", "leakage", "nnmp", "privacy_measurement", "privacy_table"]


def layer0_dictionary(base_model: nn.Module, layer_key: str, vocab_size: int, *, chunk: int = 512) -> torch.Tensor:
    """``(vocab_size, d)``: the input of ``layer_key`` (a layer-0 module) for every token id alone (a one-token
    sequence: at layer 0 a token's input depends on it alone, position aside)."""
    module = dict(base_model.named_modules())[layer_key]
    rows: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, output: Any) -> None:
        rows.append(args[0].detach().float()[:, 0, :].cpu())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, vocab_size, chunk):
                ids = torch.arange(start, min(start + chunk, vocab_size)).unsqueeze(1)
                base_model(input_ids=ids.to(next(base_model.parameters()).device))
    finally:
        handle.remove()
    return torch.cat(rows)


def _nnls(a: torch.Tensor, b: torch.Tensor, iterations: int = 500) -> torch.Tensor:
    """min ||a x - b|| over x >= 0 (projected gradient, step 1/L): small supports only."""
    lipschitz = float(torch.linalg.matrix_norm(a, ord=2)) ** 2 or 1.0
    x = torch.zeros(a.shape[1], dtype=a.dtype)
    for _ in range(iterations):
        x = (x - a.T @ (a @ x - b) / lipschitz).clamp(min=0)
    return x


def nnmp(target: torch.Tensor, atoms: torch.Tensor, k: int) -> list[int]:
    """Non-negative matching pursuit: up to ``k`` rows of ``atoms`` whose non-negative combination explains
    ``target`` (greedy on the residual's positive correlation, non-negative least squares on the support)."""
    target = target.double()
    atoms = atoms.double()
    norms = atoms.norm(dim=1).clamp_min(1e-12)
    support: list[int] = []
    residual = target.clone()
    for _ in range(k):
        scores = atoms @ residual / norms
        if support:
            scores[support] = -float("inf")
        j = int(scores.argmax())
        if scores[j] <= 0:
            break
        support.append(j)
        chosen = atoms[support].T
        residual = target - chosen @ _nnls(chosen, target)
    return support


def leakage(
    base_model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layer_keys: Sequence[str],
    template_ids: set[int],
    *,
    vocab_size: int,
    epsilon: float | None,
    draws: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """NNMP on the first key of ``layer_keys`` (a layer-0 module) of the statistics released about ``batch`` with
    ``epsilon``, and on ``draws`` random vectors of the same shape and norm; the attacker's budget is the number of
    distinct tokens the batch holds. Returns the content tokens in the batch and those recovered (mean, max): from
    the released statistics (``draws`` releases with fresh noise; one without ``epsilon``) and from random ones."""
    key = layer_keys[0]
    mask = batch.get("attention_mask")
    ids = batch["input_ids"] if mask is None else batch["input_ids"][mask.bool()]
    held = {int(t) for t in ids.flatten()}
    content = held - set(template_ids)
    atoms = layer0_dictionary(base_model, key, vocab_size)
    g = torch.Generator().manual_seed(seed)
    budget = len(held)
    shipped, randoms = [], []
    for _ in range(1 if epsilon is None else draws):  # each draw: the release with other noise
        stats = released_statistics(base_model, batch, layer_keys, epsilon, generator=g)[key].flatten()
        shipped.append(len(set(nnmp(stats, atoms, budget)) & content))
    for _ in range(draws):
        r = torch.randn(stats.shape, generator=g, dtype=torch.float64)
        r = r * float(stats.norm()) / float(r.norm())
        randoms.append(len(set(nnmp(r, atoms, budget)) & content))
    return {
        "epsilon": epsilon, "layer": key, "distinct_tokens": len(held), "content_tokens": len(content),
        "recovered_shipped_mean": statistics.fmean(shipped), "recovered_shipped_max": max(shipped),
        "recovered_random_mean": statistics.fmean(randoms), "recovered_random_max": max(randoms), "budget": budget,
    }  # fmt: skip


def privacy_measurement(*, epsilons: Sequence[float | None] = (None, 8.0, 1.0), hidden_size: int = 128,
                        examples: int = 4, draws: int = 10) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`leakage` on a tiny random Llama of width ``hidden_size`` (wider than the tokens a batch holds, so the
    attack works on exact statistics) for a batch of ``examples`` prompts of the attack suite's task, the layer
    keys of its q_proj and v_proj inputs, at each of ``epsilons``."""
    from ..data.tokenization import collate_for_training, encode_for_training
    from ..runtime.model_loading import tiny_random_model
    from .attacks import last_letter_task, task_template

    model, tokenizer = tiny_random_model(hidden_size=hidden_size, num_hidden_layers=2, seed=0)
    task = last_letter_task(n_train=64, n_test=2)
    batch = collate_for_training([encode_for_training(e, tokenizer, max_len=48) for e in task.train[:examples]],
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    template = set(tokenizer(task_template())["input_ids"]) | set(tokenizer.all_special_ids)
    keys = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    return [leakage(model, batch, keys, template, vocab_size=len(tokenizer), epsilon=eps, draws=draws)
            for eps in epsilons]  # fmt: skip


def privacy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The measurement as markdown: per epsilon, the content tokens recovered from the released statistics and
    from random ones."""
    lines = [
        "# What the task statistics leak: matching pursuit on a member's layer-0 h0",
        "",
        "NNMP over the per-token layer-0 inputs (budget: the distinct tokens the batch holds); content tokens: those "
        "of the batch outside its prompt template. Released: the statistics as a member registers them "
        "(stats_epsilon; mean and max over fresh noise draws); random: Gaussian statistics of the same shape and norm.",
        "",
        "| stats_epsilon | content tokens | recovered, released (mean / max) | recovered, random (mean / max) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        eps = "none (exact)" if r["epsilon"] is None else f"{r['epsilon']:g}"
        lines.append(f"| {eps} | {r['content_tokens']} | {r['recovered_shipped_mean']:.2f} / "
                     f"{r['recovered_shipped_max']} | {r['recovered_random_mean']:.2f} / {r['recovered_random_max']} |")  # fmt: skip
    return "\n".join(lines) + "\n"
