"""The evaluator's Arrow anchor row (issue 21): the MoE's experts exported as LoRA and scored through PEFT's Arrow.

With one expert Arrow has nothing to choose and must answer exactly as the MoE with that expert always on; with
several it routes per token and still answers every question; the MoE it reads is left as it was."""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model

import peft_sorlora
from moe_router import ImplicitMoEForCausalLM
from sorlora.data.synthetic import synthetic_task
from sorlora.evaluation.final_models import EVAL_ANCHORS, arrow_accuracy, score
from sorlora.evaluation.scoring import per_question
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base

TASKS = {t: synthetic_task(t, n_train=8, n_test=12) for t in ("synthetic-alpha", "synthetic-beta")}
KW = {"batch_size": 6, "max_len": 48}


def _update(base, tokenizer, task: str, slot: int):
    """A calibrated SO-LoRA update of ``task`` with a random B (big enough that its answers are not the base's)."""
    model = get_peft_model(copy.deepcopy(base), peft_sorlora.SOLoRAConfig(
        r=4, sparsity=0.5, slot=slot, init_weights=False, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    batch = tokenizer([e.prompt for e in TASKS[task].train], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    peft_sorlora.calibrate(
        model, [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(40.0)
    return peft_sorlora.get_sparse_update(model, round=0)


def test_arrow_scores_the_moes_experts_through_peft():
    assert EVAL_ANCHORS == ("arrow",)
    base, tokenizer, _ = load_base(TINY_BASE_ID)
    updates = [_update(base, tokenizer, t, slot) for slot, t in enumerate(TASKS)]
    single = ImplicitMoEForCausalLM.from_adapters(copy.deepcopy(base), adapters=updates[:1]).eval()
    with single.router_settings(router="sum", refine="none"):
        expected = score(single, tokenizer, TASKS, **KW)
    assert per_question(expected) != per_question(score(base, tokenizer, TASKS, **KW)), "the expert changes answers"
    got = arrow_accuracy(single, copy.deepcopy(base), TASKS, tokenizer, **KW)
    assert per_question(got) == per_question(expected), "one expert: Arrow is that expert, always on"

    moe = ImplicitMoEForCausalLM.from_adapters(copy.deepcopy(base), adapters=updates).eval()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    both = arrow_accuracy(moe, copy.deepcopy(base), TASKS, tokenizer, **KW)
    assert all(r["n"] == len(TASKS[t].test) and 0 <= r["accuracy"] <= 1 for t, r in both.items())
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in before.items()), "the MoE is read, never changed"


def test_arrow_scores_in_float32_when_the_evaluation_runs_in_bfloat16():
    """The demo evaluates in bfloat16 autocast, under which PEFT 0.21's Arrow forward fails (scatter_ of mixed
    dtypes): the anchor row is scored in float32 whatever the evaluation's precision, with the same answers."""
    base, tokenizer, _ = load_base(TINY_BASE_ID)
    updates = [_update(base, tokenizer, t, slot) for slot, t in enumerate(TASKS)]
    moe = ImplicitMoEForCausalLM.from_adapters(copy.deepcopy(base), adapters=updates).eval()
    in_bf16 = arrow_accuracy(moe, copy.deepcopy(base), TASKS, tokenizer, **KW, precision="bfloat16")
    in_fp32 = arrow_accuracy(moe, copy.deepcopy(base), TASKS, tokenizer, **KW)
    assert per_question(in_bf16) == per_question(in_fp32)
