"""SO-LoRA specifics: config validation, projections, masks and budget, sparse payloads, transformers integration."""

from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

import peft_sorlora
from peft_sorlora import (
    PayloadError,
    SOLoRAConfig,
    SparseUpdate,
    allocate_budget,
    apply_sparse_update,
    calibrate,
    get_sparse_update,
    projection_matrix,
    update_stats,
)
from peft_sorlora.layer import SOLoRALayer

from .solora_models import tiny_llama


def lm_batch(seed: int, n: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def calibrated_llama(**config) -> PeftModel:
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM")
    kwargs.update(config)
    model = get_peft_model(tiny_llama(), SOLoRAConfig(**kwargs))
    calibrate(model, [lm_batch(0)])
    return model.eval()


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("r", 0, "r must be a positive integer"),
        ("r", -3, "r must be a positive integer"),
        ("sparsity", 0.0, "sparsity must be in (0, 1]"),
        ("sparsity", 1.5, "sparsity must be in (0, 1]"),
        ("projection", "random", "projection must be one of"),
        ("sparsity_allocation", "magic", "sparsity_allocation must be one of"),
        ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
        ("slot", -1, "slot must be an integer >= 0"),
        ("mask_calibration_steps", 0, "mask_calibration_steps must be an integer >= 1"),
        ("payload_dtype", "int8", "payload_dtype must be one of"),
        ("bias", "some", "bias must be one of"),
    ],
)
def test_invalid_config_values_name_the_field(field, value, fragment):
    with pytest.raises(ValueError) as info:
        SOLoRAConfig(**{field: value})
    assert fragment in str(info.value)


def test_slot_beyond_orthogonal_capacity_is_refused():
    # in_features = 64, r = 8 -> 8 slots: 0..7
    get_peft_model(tiny_llama(), SOLoRAConfig(r=8, slot=7, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"slot must be in \[0, 7\]"):
        get_peft_model(tiny_llama(), SOLoRAConfig(r=8, slot=8, target_modules=["q_proj"]))
    # gaussian mode has no capacity limit
    get_peft_model(tiny_llama(), SOLoRAConfig(r=8, slot=8, projection="gaussian", target_modules=["q_proj"]))


def test_orthogonal_slots_are_exactly_orthogonal_on_every_layer():
    models = [calibrated_llama(slot=s, projection="orthogonal", projection_seed=11) for s in range(3)]
    layer_sets = [[m for m in model.modules() if isinstance(m, SOLoRALayer)] for model in models]
    for layers in zip(*layer_sets):
        a = [layer.solora_A["default"].double() for layer in layers]
        for i in range(3):
            torch.testing.assert_close(a[i] @ a[i].T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
            for j in range(i + 1, 3):
                assert (a[i] @ a[j].T).abs().max() < 1e-6


def _mean_cross_correlation(in_features: int, r: int = 4, peers: int = 4) -> float:
    mats = [
        projection_matrix(projection="gaussian", seed=3, slot=s, r=r, in_features=in_features, layer_key="l")
        for s in range(peers)
    ]
    values = []
    for i in range(peers):
        for j in range(i + 1, peers):
            ai = mats[i] / mats[i].norm(dim=1, keepdim=True)
            aj = mats[j] / mats[j].norm(dim=1, keepdim=True)
            values.append((ai @ aj.T).abs().mean().item())
    return sum(values) / len(values)


def test_gaussian_projections_nearly_orthogonal_and_improving_with_width():
    small, medium, large = (_mean_cross_correlation(k) for k in (64, 576, 4096))
    assert large < medium < small
    assert large < 0.02  # ~ sqrt(2/(pi k)) = 0.0125 for k = 4096
    a = projection_matrix(projection="gaussian", seed=3, slot=0, r=4, in_features=4096, layer_key="l")
    assert abs(a.pow(2).sum(dim=1).mean().item() - 1.0) < 0.1, "rows have about unit norm"


def test_projection_is_a_pure_function_of_seed_slot_layer():
    kw = dict(projection="gaussian", seed=1, slot=2, r=4, in_features=32)
    assert torch.equal(projection_matrix(**kw, layer_key="a"), projection_matrix(**kw, layer_key="a"))
    assert not torch.equal(projection_matrix(**kw, layer_key="a"), projection_matrix(**kw, layer_key="b"))


def test_budget_is_met_exactly_and_capped():
    sizes = {"a": 100, "b": 300, "c": 7}
    counts = allocate_budget(sizes, 0.37)
    assert sum(counts.values()) == round(0.37 * 407)
    skewed = allocate_budget(sizes, 0.9, {"a": 10.0, "b": 0.0, "c": 10.0})
    assert sum(skewed.values()) == round(0.9 * 407)
    assert skewed["a"] == 100 and skewed["c"] == 7, "richer spectra saturate at s_l = 1 (min, not max)"
    assert all(1 <= skewed[k] <= sizes[k] for k in sizes)


def test_calibration_keeps_budget_and_records_layer_sparsity():
    model = calibrated_llama(sparsity=0.3, sparsity_allocation="spectral_entropy")
    layers = [m for m in model.modules() if isinstance(m, SOLoRALayer)]
    kept = sum(int(m.solora_mask["default"].sum()) for m in layers)
    total = sum(m.solora_mask["default"].numel() for m in layers)
    assert kept == round(0.3 * total)
    recorded = model.peft_config["default"].layer_sparsity
    assert set(recorded) == {m.layer_key for m in layers}
    assert len(set(round(v, 6) for v in recorded.values())) > 1, "spectral allocation differs between layers"


def test_mask_selects_largest_gradient_entries():
    model = get_peft_model(tiny_llama(), SOLoRAConfig(r=4, target_modules=["q_proj"], sparsity=0.25))
    batch = lm_batch(7)
    out = model(**batch)
    out.loss.backward()  # observation: gradients recorded, B not moved
    layer = next(m for m in model.modules() if isinstance(m, SOLoRALayer))
    grad = layer.observations["default"].grad_sum.clone()
    assert torch.all(layer.solora_B["default"] == 0)
    model.base_model.finalize_ready_masks()
    mask = layer.solora_mask["default"]
    assert grad.abs()[mask].min() >= grad.abs()[~mask].max()


def test_training_loop_without_explicit_calibration_freezes_mask_automatically():
    model = get_peft_model(
        tiny_llama(),
        SOLoRAConfig(
            r=4, target_modules=["q_proj", "v_proj"], sparsity=0.5, mask_calibration_steps=2, task_type="CAUSAL_LM"
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layers = [m for m in model.modules() if isinstance(m, SOLoRALayer)]
    for step in range(4):
        model(**lm_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step < 1:
            assert all(torch.all(m.solora_B["default"] == 0) for m in layers), "B does not move while observing"
    assert model.peft_config["default"].layer_sparsity is not None
    for m in layers:
        mask = m.solora_mask["default"]
        assert 0 < int(mask.sum()) < mask.numel()
        assert torch.all(m.solora_B["default"][~mask] == 0)
        assert torch.any(m.solora_B["default"][mask] != 0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_sparse_payload_round_trip_is_bit_exact(dtype):
    model = calibrated_llama(sparsity=0.25)
    first = get_sparse_update(model, round=0, dtype=dtype)
    later = get_sparse_update(model, round=3, dtype=dtype)
    assert first.has_structure and not later.has_structure
    parsed_first = SparseUpdate.from_bytes(first.to_bytes())
    parsed_later = SparseUpdate.from_bytes(later.to_bytes(), masks=parsed_first.masks)
    for key in first.values:
        assert torch.equal(parsed_first.values[key], first.values[key])
        assert torch.equal(parsed_first.masks[key], first.masks[key])
        assert torch.equal(parsed_later.values[key], later.values[key])
    assert parsed_later.round == 3
    stats = update_stats(later)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    assert stats.value_bytes == stats.params_transmitted * itemsize
    assert stats.bytes - stats.value_bytes < 2048, "after round 0 only a small header travels beside the values"
    assert update_stats(first).bytes > stats.bytes, "round 0 also carries masks and shapes"


def test_apply_sparse_update_creates_neighbour_adapter_with_same_delta():
    sender = calibrated_llama(slot=1, projection_seed=4, sparsity=0.5)
    receiver = calibrated_llama(slot=0, projection_seed=4, sparsity=0.5)
    payload = get_sparse_update(sender, round=0).to_bytes()
    update = SparseUpdate.from_bytes(payload, expected_config_hash=peft_sorlora.config_fingerprint(receiver))
    apply_sparse_update(receiver, update, "peer1", create=True)
    for s_layer, r_layer in zip(
        [m for m in sender.modules() if isinstance(m, SOLoRALayer)],
        [m for m in receiver.modules() if isinstance(m, SOLoRALayer)],
    ):
        torch.testing.assert_close(r_layer.get_delta_weight("peer1"), s_layer.get_delta_weight("default"))
        assert not r_layer.solora_B["peer1"].requires_grad, "neighbours' adapters are not trained"
    # a later, value-only payload updates the values in place
    with torch.no_grad():
        for m in sender.modules():
            if isinstance(m, SOLoRALayer):
                m.solora_B["default"].mul_(2)
    apply_sparse_update(receiver, get_sparse_update(sender, round=1), "peer1")
    for s_layer, r_layer in zip(
        [m for m in sender.modules() if isinstance(m, SOLoRALayer)],
        [m for m in receiver.modules() if isinstance(m, SOLoRALayer)],
    ):
        torch.testing.assert_close(r_layer.get_delta_weight("peer1"), s_layer.get_delta_weight("default"))


def _corrupt(payload: bytes, how: str) -> bytes:
    if how == "truncated":
        return payload[: len(payload) // 2]
    if how == "garbage":
        return b"\x00" * 3 + payload[3:]
    if how == "not-bytes-header":
        return (10**6).to_bytes(8, "little") + payload[8:]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "garbage", "not-bytes-header"])
def test_corrupted_payloads_are_refused(how):
    payload = get_sparse_update(calibrated_llama()).to_bytes()
    with pytest.raises(PayloadError):
        SparseUpdate.from_bytes(_corrupt(payload, how))


def test_foreign_nan_and_mismatched_payloads_are_refused():
    model = calibrated_llama()
    update = get_sparse_update(model)
    with pytest.raises(PayloadError, match="foreign payload"):
        SparseUpdate.from_bytes(save_safetensors({"w": torch.zeros(3)}, metadata={"format": "other"}))
    with pytest.raises(PayloadError, match="foreign payload"):
        SparseUpdate.from_bytes(save_safetensors({"w": torch.zeros(3)}))
    key = next(iter(update.values))
    poisoned = SparseUpdate(
        values={**update.values, key: torch.full_like(update.values[key], float("nan"))},
        masks=update.masks,
        shapes=update.shapes,
        metadata=update.metadata,
    )
    with pytest.raises(PayloadError, match="NaN or Inf"):
        SparseUpdate.from_bytes(poisoned.to_bytes())
    with pytest.raises(PayloadError, match="base model"):
        SparseUpdate.from_bytes(update.to_bytes(), expected_base_model="someone/else")
    with pytest.raises(PayloadError, match="config hash"):
        SparseUpdate.from_bytes(update.to_bytes(), expected_config_hash="0" * 16)
    later = get_sparse_update(model, round=1)
    short = SparseUpdate(values={**later.values, key: later.values[key][:-1]}, metadata=later.metadata)
    with pytest.raises(PayloadError, match="values for a mask"):
        SparseUpdate.from_bytes(short.to_bytes(), masks=update.masks)
    other_rank = calibrated_llama(r=8)
    with pytest.raises(PayloadError, match="config hash"):
        apply_sparse_update(other_rank, update, "default")


def test_payload_before_calibration_is_refused():
    model = get_peft_model(tiny_llama(), SOLoRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="calibrate"):
        get_sparse_update(model)


def test_auto_peft_model_and_transformers_load_adapter(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        SOLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM"),
    )
    calibrate(model, [lm_batch(0)])
    model.eval()
    model.save_pretrained(adapter_dir)
    batch = lm_batch(9)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
        torch.testing.assert_close(auto(input_ids=batch["input_ids"]).logits, expected, atol=0, rtol=0)
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        plain.load_adapter(str(adapter_dir), adapter_name="solora")
        torch.testing.assert_close(plain(input_ids=batch["input_ids"]).logits, expected, atol=1e-6, rtol=0)


def test_load_adapter_adds_a_second_saved_adapter_and_switches(tmp_path):
    first = calibrated_llama(slot=0)
    second = calibrated_llama(slot=1, projection_seed=0)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    batch = lm_batch(11)
    with torch.no_grad():
        expect_a = first(input_ids=batch["input_ids"]).logits
        expect_b = second(input_ids=batch["input_ids"]).logits
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    model.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, expect_a, atol=0, rtol=0)
        model.set_adapter("b")
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, expect_b, atol=0, rtol=0)


_PUSH_AND_LOAD = """
import sys, torch
from safetensors.torch import load_file
import peft_sorlora
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, adapter_dir, repo_id, expected = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
model.push_to_hub(repo_id, commit_message="SO-LoRA adapter")
loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repo_id).eval()
ids = torch.arange(12).unsqueeze(0)
torch.testing.assert_close(loaded(input_ids=ids).logits, load_file(expected)["logits"], atol=0, rtol=0)
print("ok")
"""


def test_push_to_hub_and_load_from_a_hub_endpoint(tmp_path, hub_server):
    """PeftModel.push_to_hub / from_pretrained(repo id) over real HTTP (HF_ENDPOINT is read at import: subprocess)."""
    import os
    import subprocess
    import sys

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = calibrated_llama()
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(input_ids=torch.arange(12).unsqueeze(0)).logits
    save_file({"logits": expected.contiguous()}, str(tmp_path / "expected.safetensors"))
    repo_id = f"{hub_server.hub.namespace}/solora-push"
    env = dict(os.environ, HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN="test-token")
    done = subprocess.run(
        [sys.executable, "-c", _PUSH_AND_LOAD, str(base_dir), str(adapter_dir), repo_id, str(tmp_path / "expected.safetensors")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
    assert any("/commit/" in request for request in map(str, hub_server.requests)), "the push went over HTTP"
