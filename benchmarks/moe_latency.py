"""Forward latency per token of the implicit MoE with E = 1, 2, 4 experts, prefill and decode, against one merged
SO-LoRA adapter (the anchor: a single-task deployment, i.e. a plain base forward) on the same model.

The MoE rows add, per target layer, ``A_all x`` (E·r components), the top-k selection and ``B_all h``. For context:
one unmerged SO-LoRA adapter, and PEFT's training-free Arrow router over the same E = 4 experts exported as exact
LoRA adapters (:func:`moe_router.export_loras`); X-LoRA when PEFT can build it on these exports (its router is an
untrained classifier here: latency only). Every router of :data:`moe_router.ROUTERS` on the same E = 4 experts
(``router_<name>_E4``; ``moe_E4`` is the ``implicit`` router): ``sequence`` with 4 centroids per expert (its prefill
pools the first expert layer's input and compares it with the centroids; its decode reuses the choice), ``spectral``
per sequence, ``sum``, ``average`` and ``hard`` (expert 0 for every row). Prefill: a ``batch x length`` prompt, seconds per prompt token. Decode: one
new token per sequence with the prompt's KV cache, seconds per generated token. Run directly
(``python -m benchmarks.moe_latency``) or call :func:`run`.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_sorlora
from moe_router import ROUTERS, ImplicitMoEForCausalLM, arrow_model, export_loras, sequence_centroids
from moe_router.centroids import PROTOCOL_POOL
from sorlora.protocol.terms import CollabTerms

from .common import measure_interleaved, rows_against

__all__ = ["run", "ENTRY"]

ENTRY = "moe_latency"
ANCHOR = "merged_adapter"
_RANK = 8
_BATCH, _LENGTH = 4, 64
WORSE_NOTES = {
    "solora_unmerged": "unmerged adapter: two extra small matmuls per target layer (merge for single-task serving)",
    "moe_E1": "the router's extra work per target layer: A_all x (E·r components), top-k, B_all h",
    "moe_E2": "the router's extra work per target layer: A_all x (E·r components), top-k, B_all h",
    "moe_E4": "the router's extra work per target layer: A_all x (E·r components), top-k, B_all h",
}
_ROUTER_WORK = {
    "sequence": "prefill: pool the input embeddings and compare with the centroids; every layer: A_all x, "
    "top-k inside the chosen expert, B_all h",
    "spectral": "prefill: per layer, project the tokens on each expert's singular directions; every layer: A_all x, "
    "top-k inside the chosen expert, B_all h",
    "sum": "every component of every expert: A_all x and B_all h with no selection",
    "hard": "A_all x, the chosen expert's mask, B_all h (all E experts' components are still multiplied)",
    "average": "every component of every expert, scaled by 1/E: A_all x and B_all h with no selection",
}
ROUTER_ROWS = tuple(name for name in sorted(ROUTERS) if name != "implicit")  # implicit is moe_E4
# the router a published MoE uses unless the terms name another (issue 21's goal: within 1.2x the merged adapter)
DEFAULT_ROUTER = next(f.default for f in dataclasses.fields(CollabTerms) if f.name == "router")
WORSE_NOTES.update({f"router_{name}_E4": _ROUTER_WORK[name] for name in ROUTER_ROWS if name in _ROUTER_WORK})
if DEFAULT_ROUTER in _ROUTER_WORK:
    WORSE_NOTES[f"router_{DEFAULT_ROUTER}_E4"] = f"the default router; {_ROUTER_WORK[DEFAULT_ROUTER]}"
NOTES = {
    "arrow_E4": "PEFT Arrow over the same 4 experts as LoRA exports (training-free router, top-1)",
    "xlora_E4": "PEFT X-LoRA over the same exports: a scaling pass (an extra base forward) before every forward",
}


def _config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    )


def _base(state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(_config())
    model.load_state_dict(state)
    return model.eval()


def _expert(state: dict[str, torch.Tensor], slot: int, batch: dict[str, torch.Tensor]):
    model = get_peft_model(
        _base(state),
        peft_sorlora.SOLoRAConfig(
            r=_RANK, sparsity=0.5, slot=slot, init_weights=False, target_modules=["q_proj", "v_proj"]
        ),
    )
    peft_sorlora.calibrate(model, [batch])
    return model.eval()


def _xlora(state: dict[str, torch.Tensor], paths: list[Path]) -> torch.nn.Module | None:
    """X-LoRA over the exported experts, or None when this PEFT cannot build it on this model."""
    try:
        from peft import XLoraConfig  # noqa: PLC0415

        config = XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=_config().hidden_size,
            adapters={str(i): str(p) for i, p in enumerate(paths)},
        )
        base = _base(state)
        base.config.use_cache = False
        return get_peft_model(base, config).eval()
    except Exception:  # noqa: BLE001 - X-LoRA is optional context; its absence is reported, not fatal
        return None


def _prefill(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    @torch.no_grad()
    def call() -> None:
        model(input_ids=ids, use_cache=False)

    return call


def _decode(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None] | None:
    """One-token forward on top of the prompt's KV cache (the cache is copied so every call sees the same length)."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        return None
    nxt = ids[:, -1:]
    mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)

    @torch.no_grad()
    def call() -> None:
        model(input_ids=nxt, attention_mask=mask, past_key_values=copy.deepcopy(cache), use_cache=True)

    return call


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    """Rows per token for prefill and decode: merged adapter (anchor), unmerged SO-LoRA, MoE with E = 1, 2, 4
    (rank 8 each, top-k = 8, the ``implicit`` router), every other router on the E = 4 experts, Arrow and (if
    available) X-LoRA over the same 4 experts. ``quick`` skips X-LoRA."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    torch.manual_seed(0)
    state = LlamaForCausalLM(_config()).state_dict()
    input_ids = torch.randint(0, 1024, (_BATCH, _LENGTH), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": input_ids, "labels": input_ids}
    peers = [_expert(state, slot, batch) for slot in range(4)]
    updates = [peft_sorlora.get_sparse_update(p, round=0) for p in peers]
    models: dict[str, torch.nn.Module] = {ANCHOR: peers[0].merge_and_unload(), "solora_unmerged": peers[1]}
    for count in (1, 2, 4):
        models[f"moe_E{count}"] = ImplicitMoEForCausalLM.from_adapters(
            _base(state), adapters=updates[:count], router_top_k=_RANK
        ).eval()
    bare = _base(state)
    pool = PROTOCOL_POOL  # what published MoEs pool (the members' centroids: mean input embeddings)
    centroids = [  # each expert's centroids from its own slice of prompts (random tokens: latency only)
        sequence_centroids(bare, {"input_ids": torch.roll(input_ids, e, dims=0)}, pool_layer=pool, k=4, seed=e)
        for e in range(4)
    ]
    for name in ROUTER_ROWS:
        moe = ImplicitMoEForCausalLM.from_adapters(
            _base(state),
            adapters=updates,
            router_top_k=_RANK,
            centroids=centroids,
            router=name,
            router_options={"sequence": {"pool_layer": pool}},
        ).eval()
        if name == "hard":
            moe.router.expert_ids = 0  # the oracle's expert for every row (what expert_ids=0 sets per call)
        models[f"router_{name}_E4"] = moe
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        paths = export_loras(models["moe_E4"], tmp)
        models["arrow_E4"] = arrow_model(_base(state), paths, top_k=1).eval()
        xlora = None if quick else _xlora(state, paths)
        if xlora is not None:
            models["xlora_E4"] = xlora
        prefill = measure_interleaved({n: _prefill(m, input_ids) for n, m in models.items()}, repeats=repeats)
        decoders = {n: _decode(m, input_ids) for n, m in models.items()}
    decode = measure_interleaved({n: f for n, f in decoders.items() if f is not None}, repeats=repeats)
    params = {"model": "tiny-llama (hidden 256, 4 layers)", "batch": _BATCH, "prompt_len": _LENGTH, "rank": _RANK,
              "top_k": _RANK, "targets": ["q_proj", "v_proj"], "xlora": xlora is not None,
              "routers": ["implicit", *ROUTER_ROWS], "default_router": DEFAULT_ROUTER}  # fmt: skip
    prefill_tokens, decode_tokens = _BATCH * _LENGTH, _BATCH
    rows = rows_against(
        ENTRY, {n: m.scaled(1 / prefill_tokens) for n, m in prefill.items()}, anchor=ANCHOR, unit="s/token",
        anchor_label="merged adapter", notes=NOTES, worse_notes=WORSE_NOTES, params=params, group=f"{ENTRY}/prefill",
    )  # fmt: skip
    rows += rows_against(
        ENTRY, {n: m.scaled(1 / decode_tokens) for n, m in decode.items()}, anchor=ANCHOR, unit="s/token",
        anchor_label="merged adapter", notes=NOTES, worse_notes=WORSE_NOTES, params=params, group=f"{ENTRY}/decode",
    )  # fmt: skip
    for row in rows:
        row["name"] = f"{row['group'].rsplit('/', 1)[1]} {row['name']}"
    return rows


if __name__ == "__main__":
    for row in run():
        print(f"{row['name']:>24}  median {row['median'] * 1e6:9.2f} µs/token  ratio {row['ratio']:.2f}")
