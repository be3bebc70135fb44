"""Compute precision (sorlora/runtime/precision.py), the training loss over labelled positions only, and the checks of
terms values added with them."""

from __future__ import annotations

import pytest
import torch

from sorlora.data.synthetic import synthetic_task
from sorlora.data.tokenization import collate_for_training, encode_for_training
from sorlora.evaluation.scoring import evaluate
from sorlora.methods.specs import METHOD_SPECS
from sorlora.protocol.terms import TermsError
from sorlora.runtime.model_loading import tiny_random_model
from sorlora.runtime.precision import autocast
from sorlora.runtime.workspace import Workspace, answer_loss
from sorlora.simulation.config import ConfigError, ExperimentConfig
from sorlora.simulation.setup import terms_for


def _batch(tokenizer, n=6, max_len=40):
    task = synthetic_task("alpha", n_train=n, n_test=1)
    encoded = [encode_for_training(e, tokenizer, max_len=max_len) for e in task.train]
    return collate_for_training(encoded, pad_token_id=tokenizer.pad_token_id)


def test_answer_loss_equals_the_models_own_loss_and_its_gradient():
    model, tokenizer = tiny_random_model(seed=0)
    batch = _batch(tokenizer)
    assert (batch["labels"] == -100).float().mean() > 0.3, "prompts carry no labels: positions are really skipped"
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch).loss
    full_grads = torch.autograd.grad(full, params)
    trimmed = answer_loss(model, batch)
    trimmed_grads = torch.autograd.grad(trimmed, params)
    assert torch.allclose(full, trimmed, atol=1e-6), (float(full), float(trimmed))
    for g_full, g_trim in zip(full_grads, trimmed_grads):
        assert torch.allclose(g_full, g_trim, atol=1e-5)


def test_answer_loss_refuses_a_batch_without_labels():
    model, tokenizer = tiny_random_model(seed=0)
    batch = _batch(tokenizer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="without any labelled token"):
        answer_loss(model, batch)


@pytest.mark.parametrize("method", ["solora", "lora"])
def test_bfloat16_training_moves_the_adapter_and_lowers_the_loss_with_float32_state(method):
    from .test_simulation_runner import TINY

    base, tokenizer = tiny_random_model(seed=0)
    terms = terms_for(TINY.replace(precision="bfloat16"), method, base_model="tiny-random-llama", fingerprint="0" * 16)
    assert terms.precision == "bfloat16"
    ws = Workspace(base, "tiny-random-llama", terms, METHOD_SPECS[method].kind)
    ws.add_adapter("peer00", 0)
    batch = _batch(tokenizer)
    if ws.kind.calibrates:
        ws.calibrate("peer00", [batch])
    before = {k: v.detach().clone() for k, v in ws.model.named_parameters() if ".peer00" in k}
    assert before
    losses = ws.train("peer00", ["peer00"], [batch] * 12, lr=1e-2)
    after = dict(ws.model.named_parameters())
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(before[k], after[k]) for k in before), "no adapter weight moved"
    assert all(after[k].dtype == torch.float32 for k in before), "adapter weights stay float32"


def test_bfloat16_evaluation_is_close_to_float32_and_runs_in_bfloat16():
    model, tokenizer = tiny_random_model(seed=0)
    task = synthetic_task("gamma", n_train=1, n_test=8, n_options=3)
    exact = evaluate(model, tokenizer, task, max_len=48)
    mixed = evaluate(model, tokenizer, task, max_len=48, precision="bfloat16")
    assert exact["n"] == mixed["n"] == 8
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.inference_mode(), autocast("bfloat16", "cpu"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    hook.remove()
    assert seen == [torch.bfloat16]
    agree = sum(a == b for a, b in zip(exact["correct"], mixed["correct"]))
    assert agree >= 6, (exact["correct"], mixed["correct"])


def test_a_wrong_precision_is_one_clear_error_everywhere():
    with pytest.raises(ConfigError, match="precision"):
        ExperimentConfig(precision="fp8")
    from .test_simulation_runner import TINY

    terms = terms_for(TINY, "solora", base_model="tiny-random-llama", fingerprint="0" * 16)
    with pytest.raises(TermsError, match="precision must be one of float32, bfloat16"):
        type(terms).from_dict({**terms.to_dict(), "precision": "half"})
    with pytest.raises(ValueError, match="precision must be one of"):
        with autocast("half", "cpu"):
            pass


@pytest.mark.parametrize("deadline", [-1, 0, float("nan"), float("inf"), "soon", True])
def test_a_registration_deadline_must_be_a_positive_number(deadline):
    from sorlora.protocol.terms import CollabTerms

    with pytest.raises(TermsError, match="registration_deadline_s must be a positive number or null"):
        CollabTerms(base_model="tiny-random-llama", base_fingerprint="0" * 16, registration_deadline_s=deadline)
    assert CollabTerms(base_model="tiny-random-llama", base_fingerprint="0" * 16, registration_deadline_s=30).sha256()
