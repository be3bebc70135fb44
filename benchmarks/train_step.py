"""Train step time and peak memory: SO-LoRA against PEFT LoRA (the anchor) on the same model, rank and targets.

One step = forward with labels, backward, ``AdamW.step()``, ``zero_grad``; the two models take turns in every
repeat. SO-LoRA's masks are calibrated before timing (calibration is a one-off, not a train step). Peak memory is
the process RSS peak during one step above the RSS before it (:class:`benchmarks.common.PeakRSS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

import peft_sorlora

from .common import (
    PeakRSS,
    constant,
    measure_interleaved,
    rows_against,
    seed_everything,
    smollm2,
    tiny_llama,
    token_batch,
)

__all__ = ["run", "ENTRY"]

ENTRY = "train_step"
RANK, ALPHA, TARGETS, LR = 8, 16, ("q_proj", "v_proj"), 1e-3
ANCHOR = "peft_lora"
WORSE_NOTE = (
    "within run-to-run noise: SO-LoRA does LoRA's two small matmuls per layer plus B*M (~5 µs per layer on "
    "SmolLM2 shapes) and skips LoRA's grad of A (A is frozen); see min-max"
)


def _models(make_base: Callable[[], torch.nn.Module]) -> dict[str, torch.nn.Module]:
    lora = get_peft_model(
        make_base(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)
    )
    solora = get_peft_model(
        make_base(),
        peft_sorlora.SOLoRAConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), sparsity=0.5),
    )
    return {ANCHOR: lora, "solora": solora}


def _step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _case(
    label: str, make_base: Callable[[], torch.nn.Module], batch_size: int, length: int, repeats: int
) -> list[dict]:
    seed_everything()
    models = _models(make_base)
    batch = token_batch(models[ANCHOR], batch_size, length)
    peft_sorlora.calibrate(models["solora"], [batch])
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    steps = {name: _step_fn(m, batch) for name, m in models.items()}
    times = measure_interleaved(steps, repeats=repeats, warmup=1)
    memory = {}
    for name, step in steps.items():
        with PeakRSS() as peak:
            step()
        memory[name] = constant(peak.delta / 2**20)
    params = {
        "model": label,
        "batch": batch_size,
        "seq_len": length,
        "rank": RANK,
        "lora_alpha": ALPHA,
        "target_modules": list(TARGETS),
        "sparsity": 0.5,
        "optimizer": f"AdamW(lr={LR})",
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
    }
    rows = rows_against(
        ENTRY, times, anchor=ANCHOR, unit="s/step", anchor_label="PEFT LoRA", worse_notes={"solora": WORSE_NOTE},
        params=params,
        group=f"{ENTRY}/{label}/time",
    )  # fmt: skip
    mem_note = {"solora": "peak RSS above the pre-step RSS in one step: activations dominate both; within noise"}
    rows += rows_against(
        ENTRY, memory, anchor=ANCHOR, unit="MiB peak", anchor_label="PEFT LoRA", worse_notes=mem_note, params=params,
        group=f"{ENTRY}/{label}/memory",
    )  # fmt: skip
    for row in rows:
        row["name"] = f"{label} {row['name']}"
    return rows


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    """Rows for the tiny Llama (batch 8 x 64) and, unless ``quick``, the real SmolLM2-135M (batch 8 x 64)."""
    rows = _case("tiny-llama", tiny_llama, 8, 64, repeats)
    if not quick:
        rows += _case("smollm2-135m", lambda: smollm2()[0], 8, 64, repeats)
    return rows
