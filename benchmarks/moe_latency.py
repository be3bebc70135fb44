"""Forward latency of the implicit MoE with E = 1, 2, 4 experts against one merged SO-LoRA adapter on the same model.

The anchor is the cost a single-task deployment pays: one adapter merged into W0 (a plain base forward). The MoE
rows add, per target layer, ``A_all x`` (E·r components), the top-k selection and ``B_all h``. Run directly
(``python -m benchmarks.moe_latency``) or call :func:`run`.
"""

from __future__ import annotations

import statistics
import time

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_sorlora
from moe_router import ImplicitMoEForCausalLM

__all__ = ["run"]

ANCHOR = "merged_adapter"
_RANK = 8
_BATCH, _LENGTH = 4, 64


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


@torch.no_grad()
def _time(models: dict[str, torch.nn.Module], input_ids: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward for each model; models take turns within each repeat so that load drifts hit all alike."""
    for model in models.values():
        model(input_ids=input_ids)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=input_ids)
            times[name].append(time.perf_counter() - start)
    return times


def run(repeats: int = 5) -> list[dict]:
    """Rows ``{name, median_s, min_s, max_s, ratio_to_anchor, anchor}``: the merged adapter (anchor), one unmerged
    SO-LoRA adapter (for context), then the MoE with E = 1, 2, 4 experts (rank 8 each, top-k = 8)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    torch.manual_seed(0)
    state = LlamaForCausalLM(_config()).state_dict()
    input_ids = torch.randint(0, 1024, (_BATCH, _LENGTH), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": input_ids, "labels": input_ids}
    peers = [_expert(state, slot, batch) for slot in range(4)]
    updates = [peft_sorlora.get_sparse_update(p, round=0) for p in peers]
    models = {ANCHOR: peers[0].merge_and_unload(), "solora_unmerged": peers[1]}
    for count in (1, 2, 4):
        models[f"moe_E{count}"] = ImplicitMoEForCausalLM.from_adapters(
            _base(state), adapters=updates[:count], router_top_k=_RANK
        ).eval()
    timings = _time(models, input_ids, repeats)
    anchor = statistics.median(timings[ANCHOR])
    return [
        {
            "name": name,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "ratio_to_anchor": statistics.median(t) / anchor,
            "anchor": ANCHOR,
        }
        for name, t in timings.items()
    ]


if __name__ == "__main__":
    for row in run():
        print(f"{row['name']:>15}  median {row['median_s'] * 1e3:7.2f} ms  ratio {row['ratio_to_anchor']:.2f}")
