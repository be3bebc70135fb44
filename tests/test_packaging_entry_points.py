"""SO-LoRA trains under every entry point a PEFT user reaches for, without an explicit ``calibrate``.

``get_peft_model`` without ``task_type`` returns a bare ``PeftModel`` whose forward calls the base model directly;
with ``task_type`` a ``PeftModelForCausalLM``; ``transformers.Trainer`` and accelerate drive either. In each, the
first batch observes (the masks freeze in the layers themselves), then the masked entries of B move and the loss
goes down. Each test asserts that the adapter's weights and the loss actually changed.
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import get_peft_model

import peft_sorlora
from peft_sorlora import SOLoRAConfig, trainable_entries
from peft_sorlora.layer import SOLoRALayer

from .solora_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(**overrides) -> SOLoRAConfig:
    return SOLoRAConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "sparsity": 0.25, **overrides})


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _b(model) -> dict[str, torch.Tensor]:
    return {n: m.solora_B["default"].detach().clone() for n, m in model.named_modules() if isinstance(m, SOLoRALayer)}


def _assert_trained(model, b_before: dict[str, torch.Tensor], losses: list[float]) -> None:
    after = _b(model)
    assert model.peft_config["default"].layer_sparsity is not None, "the masks must have frozen"
    moved = [n for n in after if not torch.equal(after[n], b_before[n])]
    assert moved == list(after), f"B must move on every adapted layer; unchanged: {set(after) - set(moved)}"
    for name, module in model.named_modules():
        if isinstance(module, SOLoRALayer):
            outside = after[name][~module.solora_mask["default"]]
            assert torch.count_nonzero(outside) == 0, f"{name}: entries outside the mask moved"
    kept, total = trainable_entries(model)
    assert kept == round(0.25 * total)
    assert losses[-1] < losses[0] - 1e-3, f"the loss must go down: {losses}"


def _plain_loop(model, steps: int = 6) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"], ids=["peftmodel-no-task-type", "causal-lm"])
def test_plain_loop_trains_without_explicit_calibration(task_type, caplog):
    model = get_peft_model(tiny_llama(), _config(task_type=task_type))
    assert type(model).__name__ == ("PeftModel" if task_type is None else "PeftModelForCausalLM")
    before = _b(model)
    with caplog.at_level(logging.INFO, logger="peft_sorlora"):
        losses = _plain_loop(model)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6), "the first batch observes: B does not move in step 1"
    _assert_trained(model, before, losses)
    messages = [r.getMessage() for r in caplog.records]
    assert any("observe B's gradients" in m for m in messages), messages
    assert any("masks frozen" in m for m in messages), messages


def test_trainer_trains_and_first_step_observes(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), _config(task_type="CAUSAL_LM"))
    before = _b(model)
    batch = _batch()
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    assert logs[0]["grad_norm"] == 0.0, "step 1 observes (B gets a zero gradient)"
    assert all(h["grad_norm"] > 0 for h in logs[1:]), [h["grad_norm"] for h in logs]
    _assert_trained(model, before, [h["loss"] for h in logs])


def test_accelerate_loop_trains():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_llama(), _config())
    before = _b(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**_batch()).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    _assert_trained(accelerator.unwrap_model(model), before, losses)


def test_two_calibration_steps_observe_two_batches():
    model = get_peft_model(tiny_llama(), _config(mask_calibration_steps=2))
    before = _b(model)
    losses = _plain_loop(model, steps=7)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) == pytest.approx(losses[2], abs=1e-6)
    _assert_trained(model, before, losses)


def test_trainable_entries_before_and_after_the_masks_freeze():
    model = get_peft_model(tiny_llama(), _config())
    kept, total = trainable_entries(model)
    assert total == sum(m.solora_B["default"].numel() for m in model.modules() if isinstance(m, SOLoRALayer))
    assert kept == round(0.25 * total)
    peft_sorlora.calibrate(model, [_batch()])
    assert trainable_entries(model) == (kept, total)


def test_print_trainable_parameters_says_how_many_entries_of_b_train(capsys):
    model = get_peft_model(tiny_llama(), _config())
    kept, total = trainable_entries(model)
    model.print_trainable_parameters()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trainable params:")  # PEFT's own line stays
    assert (
        out[1]
        == f"SO-LoRA: {kept:,d} of the {total:,d} entries of B train (25.00%; masks chosen by the first training batch(es))"
    )


DISTRIBUTED = """
import os, sys, torch, torch.distributed as dist
from peft import get_peft_model
sys.path.insert(0, os.environ["REPO"])
import peft_sorlora
from peft_sorlora.layer import SOLoRALayer
from tests.solora_models import tiny_llama

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + os.environ["RENDEZVOUS"], rank=rank, world_size=2)
config = peft_sorlora.SOLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], sparsity=0.25,
                                   sparsity_allocation="spectral_entropy")
model = torch.nn.parallel.DistributedDataParallel(get_peft_model(tiny_llama(), config))
ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(100 + rank))  # each rank its shard
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
for _ in range(2):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
masks = {n: m.solora_mask["default"] for n, m in model.module.named_modules() if isinstance(m, SOLoRALayer)}
torch.save(masks, os.environ["OUT"] + f"/masks-{rank}.pt")
dist.destroy_process_group()
"""


def test_several_processes_freeze_the_same_masks(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, REPO=str(Path(__file__).parents[1]), RENDEZVOUS=str(tmp_path / "rdzv"), OUT=str(tmp_path))
    procs = [
        subprocess.Popen([sys.executable, "-c", DISTRIBUTED, str(r)], env=env, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    first, second = (torch.load(tmp_path / f"masks-{r}.pt") for r in range(2))
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name}: ranks chose different masks"
