"""Bytes on the wire per peer per round (one payload per link): SO-LoRA against dense LoRA at the same rank.

Figures per value dtype (fp32/fp16/bf16): the dense LoRA payload (anchor: A and B in full, as
:class:`sorlora_gossip.dense.DenseUpdate` sends them), SO-LoRA's round-0 payload (values + masks + shapes), its later
payloads (values only), and the limit ``nnz x value bytes``. All are real ``len(payload.to_bytes())``: deterministic,
so median = min = max.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

import peft_sorlora
from sorlora_gossip.dense import DenseUpdate

from .common import constant, rows_against, seed_everything, smollm2, tiny_llama, token_batch

__all__ = ["run", "ENTRY"]

ENTRY = "wire_bytes"
RANK, ALPHA, TARGETS, SPARSITY = 8, 16, ("q_proj", "v_proj"), 0.5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ANCHOR = "dense_lora"
NOTES = {
    "solora_round0": "round 0 also carries the boolean masks (1 byte per B entry) and shapes, once per peer",
}


def _case(label: str, make_base: Callable[[], torch.nn.Module]) -> list[dict]:
    seed_everything()
    lora = get_peft_model(make_base(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    solora = get_peft_model(
        make_base(),
        peft_sorlora.SOLoRAConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), sparsity=SPARSITY),
    )
    peft_sorlora.calibrate(solora, [token_batch(solora, 2, 32)])
    dense_state = get_peft_model_state_dict(lora)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        dense = DenseUpdate(
            values={k: v.detach().to(dtype) for k, v in dense_state.items()},
            metadata={"base_model": label, "config_hash": "bench", "round": "1"},
        )
        first = peft_sorlora.get_sparse_update(solora, round=0, dtype=dtype_name)
        later = peft_sorlora.get_sparse_update(solora, round=1, dtype=dtype_name)
        figures = {
            ANCHOR: constant(len(dense.to_bytes())),
            "solora_round0": constant(len(first.to_bytes())),
            "solora_round_n": constant(len(later.to_bytes())),
            "limit_nnz_x_value_bytes": constant(peft_sorlora.update_stats(later).value_bytes),
        }
        params = {
            "model": label,
            "dtype": dtype_name,
            "rank": RANK,
            "target_modules": list(TARGETS),
            "sparsity": SPARSITY,
            "dense_params": dense.num_values,
            "solora_nnz": later.num_values,
        }
        group = rows_against(
            ENTRY, figures, anchor=ANCHOR, unit="bytes", anchor_label=f"dense LoRA {dtype_name}", notes=NOTES,
            params=params, group=f"{ENTRY}/{label}/{dtype_name}",
        )  # fmt: skip
        for row in group:
            row["name"] = f"{label} {dtype_name} {row['name']}"
        rows += group
    return rows


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    """Rows for the tiny Llama and, unless ``quick``, SmolLM2-135M (rank 8 on q_proj/v_proj, sparsity 0.5).

    ``repeats`` is accepted for the common entry signature; byte counts are deterministic.
    """
    rows = _case("tiny-llama", tiny_llama)
    if not quick:
        rows += _case("smollm2-135m", lambda: smollm2()[0])
    return rows
