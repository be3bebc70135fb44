"""End to end on the real bundled SmolLM2-135M-Instruct (``peft_sorlora.load_base_model()``, no download): Trainer,
save_pretrained, reload, merge_and_unload, with the portable base identity everywhere."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from model_cards import check_card
from peft_sorlora import BUNDLED_BASE_ID, SOLoRAConfig, get_sparse_update, load_base_model, update_stats

pytestmark = pytest.mark.slow


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


def test_bundled_smollm2_with_trainer_save_reload_and_merge(tmp_path):
    base, tokenizer = load_base_model()
    assert base.name_or_path == BUNDLED_BASE_ID and getattr(base, "hf_quantizer", None) is None
    torch.manual_seed(0)
    config = SOLoRAConfig(
        r=8, lora_alpha=16, sparsity=0.5, sparsity_allocation="spectral_entropy", task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    batch = _batch(tokenizer)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)  # failed on the GGUF-loaded model before
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["grad_norm"] == 0.0 and all(h["grad_norm"] > 0 for h in logs[1:]), logs
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05, [h["loss"] for h in logs]
    update = get_sparse_update(model, round=1)
    stats = update_stats(update)
    total_b = sum(m.numel() for m in update.values.values()) / 0.5
    assert abs(stats.params_transmitted - 0.5 * total_b) <= 1

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == BUNDLED_BASE_ID
    card = check_card((tmp_path / "adapter" / "README.md").read_text(), kind="adapter")
    assert card.data.base_model == BUNDLED_BASE_ID and card.data.library_name == "peft"

    reloaded = PeftModel.from_pretrained(
        load_base_model()[0], tmp_path / "adapter"
    ).eval()  # the documented offline path
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config, "a merged dequantized model must not claim to be GGUF-quantized"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        again = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(again, expected, atol=1e-4, rtol=1e-4)
