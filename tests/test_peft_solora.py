"""SO-LoRA behaves like a first-class PEFT method: PEFT's own test matrix, emulated (integration.md)."""

from __future__ import annotations

import copy
import logging
import warnings

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import peft_sorlora
from peft_sorlora import SOLoRAConfig, calibrate
from peft_sorlora.layer import SOLoRALayer

from .solora_models import CASES, ModelCase

VARIANTS = {
    "orth-list-s50": dict(projection="orthogonal", sparsity=0.5),
    "gauss-s10-drop": dict(projection="gaussian", sparsity=0.1, lora_dropout=0.1),
    "orth-str-s100": dict(projection="orthogonal", sparsity=1.0, target_as_regex=True),
    "gauss-spectral": dict(projection="gaussian", sparsity=0.3, sparsity_allocation="spectral_entropy"),
    "orth-slot2-save": dict(projection="orthogonal", sparsity=0.25, slot=2, with_modules_to_save=True),
}


def make_config(case: ModelCase, variant: dict, **overrides) -> SOLoRAConfig:
    variant = dict(variant)
    regex = variant.pop("target_as_regex", False)
    with_save = variant.pop("with_modules_to_save", False)
    target = r"(.*\.)?(" + "|".join(case.target_modules) + r")" if regex else list(case.target_modules)
    kwargs = dict(r=4, lora_alpha=8, target_modules=target, init_weights=False, task_type=case.task_type)
    if with_save and case.modules_to_save:
        kwargs["modules_to_save"] = list(case.modules_to_save)
    kwargs.update(variant)
    kwargs.update(overrides)
    return SOLoRAConfig(**kwargs)


def build(case: ModelCase, variant: dict, **overrides) -> PeftModel:
    model = get_peft_model(case.make(), make_config(case, variant, **overrides))
    calibrate(model, [case.batch(0)], loss_fn=case.loss_fn)
    model.eval()
    return model


@pytest.fixture(params=[(c, v) for c in CASES for v in VARIANTS], ids=lambda p: f"{p[0].name}-{p[1]}")
def combo(request):
    case, variant = request.param
    return case, VARIANTS[variant]


def test_adapter_changes_output_and_disable_gives_base(combo):
    case, variant = combo
    base = case.make()
    batch = case.batch(1)
    with torch.no_grad():
        expected_base = case.output(base, batch)
    model = build(case, variant)
    with torch.no_grad():
        adapted = case.output(model, batch)
        with model.disable_adapter():
            disabled = case.output(model, batch)
    assert not torch.allclose(adapted, expected_base, atol=1e-6), "the adapter must change the output"
    torch.testing.assert_close(disabled, expected_base, atol=1e-6, rtol=0)


def test_save_load_round_trip_identical(combo, tmp_path, caplog):
    case, variant = combo
    model = build(case, variant)
    batch = case.batch(2)
    with torch.no_grad():
        before = case.output(model, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert PeftConfig.from_pretrained(tmp_path).peft_type == peft_sorlora.SOLORA
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(case.make(), tmp_path).eval()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing adapter keys" in m.lower() or "unexpected" in m.lower()], messages
    with torch.no_grad():
        after = case.output(loaded, batch)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert loaded.peft_config["default"].layer_sparsity == model.peft_config["default"].layer_sparsity
    for (n1, m1), (n2, m2) in zip(model.named_modules(), loaded.named_modules()):
        if isinstance(m1, SOLoRALayer):
            assert n1 == n2
            assert torch.equal(m1.solora_mask["default"], m2.solora_mask["default"])
            assert not m2.observations, "a reloaded calibrated adapter must not re-observe"


def test_merge_unmerged_and_merge_and_unload_agree(combo):
    case, variant = combo
    model = build(case, variant)
    batch = case.batch(3)
    with torch.no_grad():
        unmerged = case.output(model, batch)
        model.merge_adapter()
        merged = case.output(model, batch)
        model.unmerge_adapter()
        again = case.output(model, batch)
        unloaded = copy.deepcopy(model).merge_and_unload()
        plain = case.output(unloaded, batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, unmerged, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, SOLoRALayer) for m in unloaded.modules())


def test_training_changes_only_masked_B(combo):
    case, variant = combo
    model = build(case, variant, lora_dropout=0.0)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, SOLoRALayer)]
    a_before = [m.solora_A["default"].clone() for m in layers]
    b_before = [m.solora_B["default"].detach().clone() for m in layers]
    masks = [m.solora_mask["default"].clone() for m in layers]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    for step in range(3):
        batch = case.batch(10 + step)
        out = model(**batch)
        loss = case.loss_fn(out, batch) if case.loss_fn else out.loss
        loss.backward()
        for m, mask in zip(layers, masks):
            grad = m.solora_B["default"].grad
            assert torch.all(grad[~mask] == 0), "entries outside the mask must get exactly zero gradient"
        optimizer.step()
        optimizer.zero_grad()
    changed_any = False
    for m, a0, b0, mask in zip(layers, a_before, b_before, masks):
        b = m.solora_B["default"].detach()
        assert torch.equal(m.solora_A["default"], a0), "A is frozen"
        assert not m.solora_A["default"].requires_grad
        assert torch.equal(b[~mask], b0[~mask]), "unmasked entries stay bit-identical"
        assert torch.all(b[~mask] == 0)
        changed_any |= not torch.equal(b[mask], b0[mask])
        assert torch.equal(m.solora_mask["default"], mask), "the mask never changes after calibration"
    assert changed_any


def test_two_adapters_switch_and_delete(combo):
    case, variant = combo
    model = build(case, variant)
    second = make_config(case, variant, slot=1, projection_seed=5)
    model.add_adapter("other", second)
    model.set_adapter("other")
    calibrate(model, [case.batch(4)], adapter_name="other", loss_fn=case.loss_fn)
    model.eval()
    batch = case.batch(5)
    with torch.no_grad():
        out_other = case.output(model, batch)
        model.set_adapter("default")
        out_default = case.output(model, batch)
    assert not torch.allclose(out_other, out_default, atol=1e-6)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for m in model.modules():
        if isinstance(m, SOLoRALayer):
            for attr in ("solora_A", "solora_B", "solora_mask", "r", "scaling"):
                assert "other" not in getattr(m, attr)
    with torch.no_grad():
        torch.testing.assert_close(case.output(model, batch), out_default, atol=0, rtol=0)


def test_save_as_lora_reproduces_outputs(combo, tmp_path):
    case, variant = combo
    # save_as_lora exports adapter layers only (modules_to_save has no LoRA form), so export without them.
    variant = {k: v for k, v in variant.items() if k != "with_modules_to_save"}
    model = build(case, variant, lora_dropout=0.0)
    batch = case.batch(6)
    with torch.no_grad():
        expected = case.output(model, batch)
    peft.save_as_lora(tmp_path, model, rank=4)
    lora = PeftModel.from_pretrained(case.make(), tmp_path).eval()
    assert lora.peft_config["default"].peft_type == peft.PeftType.LORA
    with torch.no_grad():
        torch.testing.assert_close(case.output(lora, batch), expected, atol=1e-5, rtol=1e-4)
