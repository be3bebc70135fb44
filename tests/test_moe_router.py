"""Implicit MoE (moe_router): equality with PEFT SO-LoRA, input-dependent routing, modes, storage, Hub, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import moe_router
import peft_sorlora
from moe_router import (
    ImplicitMoEConfig,
    ImplicitMoEForCausalLM,
    ImplicitMoEForSequenceClassification,
    arrow_model,
    comparison_mode,
    export_lora,
    export_loras,
    routing_shares,
    task_gain,
    task_statistics,
)

VOCAB, HIDDEN, NUM_TASKS, R = 128, 64, 3, 4
TOKENS_PER_TASK = VOCAB // 4


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def task_batch(task: int, seed: int, batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """Tokens of task ``task`` only (a disjoint id range per task), with labels for calibration."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    ids = task * TOKENS_PER_TASK + torch.randint(0, TOKENS_PER_TASK, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama whose task token ranges embed in separate feature blocks: clearly separated synthetic tasks."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    block = HIDDEN // NUM_TASKS
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0, 0.05)
        for t in range(NUM_TASKS):
            rows = slice(t * TOKENS_PER_TASK, (t + 1) * TOKENS_PER_TASK)
            emb[rows, t * block : (t + 1) * block] += 1.0 + 0.3 * torch.randn(TOKENS_PER_TASK, block)
    path = tmp_path_factory.mktemp("moe") / "base"
    model.save_pretrained(path)
    return str(path)


def load_base(base_dir: str):
    return AutoModelForCausalLM.from_pretrained(base_dir)


def make_expert(base_dir: str, task: int, **config):
    """A calibrated SO-LoRA PeftModel for one task (random B so that its update is visible)."""
    settings = dict(r=R, sparsity=0.5, slot=task, init_weights=False, target_modules=["q_proj", "v_proj"])
    settings.update(config)
    model = get_peft_model(load_base(base_dir), peft_sorlora.SOLoRAConfig(**settings))
    peft_sorlora.calibrate(model, [task_batch(task, seed=0)])
    model.eval()
    return model


@pytest.fixture(scope="module")
def experts(base_dir):
    """One PeftModel and its round-0 SparseUpdate per task."""
    models = [make_expert(base_dir, t) for t in range(NUM_TASKS)]
    return models, [peft_sorlora.get_sparse_update(m, round=0) for m in models]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ------------------------------------------------------------------------------------------------ equality with PEFT
def test_single_expert_with_k_equal_r_matches_peft_solora(base_dir, experts, tmp_path):
    models, updates = experts
    batch = task_batch(0, seed=5)
    expected = logits(models[0], batch)
    assert (expected - logits(load_base(base_dir), batch)).abs().max() > 1e-3  # the adapter does change the output
    from_update = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=[updates[0]], router_top_k=R)
    torch.testing.assert_close(logits(from_update, batch), expected, atol=1e-5, rtol=0)
    models[0].save_pretrained(tmp_path / "adapter")
    from_dir = ImplicitMoEForCausalLM.from_adapters(base_dir, adapters=[str(tmp_path / "adapter")], router_top_k=R)
    torch.testing.assert_close(logits(from_dir, batch), expected, atol=1e-5, rtol=0)
    from_peft = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=[models[0]], router_top_k=R)
    torch.testing.assert_close(logits(from_peft, batch), expected, atol=1e-5, rtol=0)


def test_cluster_of_members_equals_peft_model_holding_all_members(base_dir, experts):
    """One expert made of two members (a cluster) = a PeftModel with both adapters active."""
    models, updates = experts
    peft_model = make_expert(base_dir, 0)
    peft_sorlora.apply_sparse_update(peft_model, updates[1], "member1", create=True)
    peft_model.base_model.set_adapter(["default", "member1"])
    batch = task_batch(1, seed=3)
    moe = ImplicitMoEForCausalLM.from_adapters(
        load_base(base_dir), experts=[[updates[0], updates[1]]], router_top_k=None
    )
    assert moe.num_experts == 1
    torch.testing.assert_close(logits(moe, batch), logits(peft_model, batch), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------- routing
def test_routing_prefers_the_expert_of_the_inputs_task(base_dir, experts):
    _, updates = experts
    calibration = {t: [task_batch(t, seed=0)] for t in range(NUM_TASKS)}
    moe = ImplicitMoEForCausalLM.from_adapters(
        load_base(base_dir), adapters=updates, calibration=calibration, router_top_k=R
    )
    assert moe.config.refine == "routing"  # the default with calibration: the best-measured setting
    for t in range(NUM_TASKS):
        shares = routing_shares(moe, task_batch(t, seed=7))
        assert shares.shape == (NUM_TASKS,)
        assert shares.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert int(shares.argmax()) == t, f"task {t}: shares {shares.tolist()}"
        assert shares[t] > 1.0 / NUM_TASKS + 0.1
    # the kept components differ between tasks, so the outputs do too: routing is input-dependent
    with moe.router_settings(top_k=None):
        summed = routing_shares(moe, task_batch(0, seed=7))
    torch.testing.assert_close(summed, torch.full((NUM_TASKS,), 1.0 / NUM_TASKS))  # k = all keeps every component


def test_task_gain_is_normalised_and_flat_statistics_leave_a_unchanged(base_dir, experts):
    assert torch.equal(task_gain(torch.full((8,), -3.0)), torch.ones(8))
    gain = task_gain(torch.randn(64))
    assert gain.pow(2).mean().item() == pytest.approx(1.0, rel=1e-5) and (gain >= 0).all()
    _, updates = experts
    keys = sorted(updates[0].values)
    flat = {k: torch.full((updates[0].shapes[k][2],), 0.5) for k in keys}
    batch = task_batch(2, seed=1)
    plain = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=updates[:2], router_top_k=R)
    refined_flat = ImplicitMoEForCausalLM.from_adapters(
        load_base(base_dir), adapters=updates[:2], calibration={0: flat, 1: flat}, router_top_k=R
    )
    torch.testing.assert_close(logits(refined_flat, batch), logits(plain, batch), atol=1e-5, rtol=0)


def test_per_member_calibration_gives_each_member_its_own_gain(base_dir, experts):
    _, updates = experts
    base = load_base(base_dir)
    batches = {(0, 0): [task_batch(0, seed=0)], (0, 1): [task_batch(1, seed=0)]}
    key = "model.layers.0.self_attn.q_proj"
    expected = [task_gain(task_statistics(base, batches[(0, m)], [key])[key]) for m in range(2)]
    moe = ImplicitMoEForCausalLM.from_adapters(base, experts=[updates[:2]], calibration=batches)
    layer = moe.expert_layers()[key]
    for m in range(2):
        torch.testing.assert_close(layer.gain[m], expected[m])
    assert not torch.allclose(layer.gain[0], layer.gain[1])
    assert layer.member.tolist() == [0] * R + [1] * R and layer.expert.tolist() == [0] * (2 * R)


def test_comparison_modes_sum_average_oracle(base_dir, experts):
    _, updates = experts
    base_logits = logits(load_base(base_dir), task_batch(0, seed=2))
    batch = task_batch(0, seed=2)
    moe = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=updates[:2], router_top_k=2)
    singles = [
        ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=[u], router_top_k=None) for u in updates[:2]
    ]
    with comparison_mode(moe, "sum"):
        summed = logits(moe, batch)
    with moe.router_settings(top_k="all"):
        torch.testing.assert_close(logits(moe, batch), summed)  # k = all recovers the plain sum
    routed = logits(moe, batch)
    assert (routed - summed).abs().max() > 1e-4  # top-2 of 8 components differs from the sum
    for e in range(2):
        with comparison_mode(moe, "oracle"):
            torch.testing.assert_close(
                moe(**{k: batch[k] for k in ("input_ids",)}, expert_ids=e).logits, logits(singles[e], batch)
            )
    with comparison_mode(moe, "oracle"):
        both = moe(input_ids=torch.cat([batch["input_ids"][:1]] * 2), task_ids=torch.tensor([0, 1])).logits
    torch.testing.assert_close(both[0], logits(singles[0], batch)[0])
    torch.testing.assert_close(both[1], logits(singles[1], batch)[0])
    # with tiny deltas the model is close to linear in the update: average sits half-way between base and sum
    with comparison_mode(moe, "task_arithmetic"):
        averaged = logits(moe, batch)
    assert (averaged - (base_logits + summed) / 2).abs().max() < 0.25 * (summed - base_logits).abs().max()
    assert moe.config.routing == "implicit" and moe.config.router_top_k == 2  # restored after the blocks
    with comparison_mode(moe, "oracle"), pytest.raises(ValueError, match="oracle routing needs expert ids"):
        logits(moe, batch)


# ----------------------------------------------------------------------------------------------------- storage
def test_save_load_local_auto_class_generate_and_remote_code(base_dir, experts, tmp_path):
    _, updates = experts
    calibration = {t: [task_batch(t, seed=0)] for t in range(2)}
    moe = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=updates[:2], calibration=calibration)
    batch = task_batch(1, seed=4)
    expected = logits(moe, batch)
    moe.save_pretrained(tmp_path / "moe")
    files = set(os.listdir(tmp_path / "moe"))
    assert {"config.json", "experts.safetensors", "modeling.py", "configuration.py", "layer.py"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)  # base not re-uploaded
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir and config["model_type"] == "solora_moe"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling.ImplicitMoEForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert isinstance(loaded, ImplicitMoEForCausalLM)
    assert loaded.config.refine == "routing" and loaded.config.router_top_k == R
    torch.testing.assert_close(logits(loaded, batch), expected, atol=0, rtol=0)
    generated = loaded.generate(input_ids=batch["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 4)
    assert generated.min() >= 0 and generated.max() < VOCAB

    save_file({"input_ids": batch["input_ids"], "logits": expected}, str(tmp_path / "ref.safetensors"))
    script = f"""
        import sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "moe")!r}, trust_remote_code=True)
        assert "moe_router" not in sys.modules and "peft_sorlora" not in sys.modules
        with torch.no_grad():
            out = model(input_ids=ref["input_ids"]).logits
        print(type(model).__module__, float((out - ref["logits"]).abs().max()))
    """
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module, diff = done.stdout.split()[-2:]
    assert module.startswith("transformers_modules") and float(diff) == 0.0


def test_save_base_in_repo_and_sequence_classification(base_dir, experts, tmp_path):
    _, updates = experts
    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=3, pad_token_id=0
    )  # head initialised at random
    moe = ImplicitMoEForSequenceClassification.from_adapters(base, adapters=updates[:2])
    batch = task_batch(0, seed=9)
    expected = logits(moe, batch)
    assert expected.shape == (4, 3)
    moe.save_pretrained(tmp_path / "cls", save_base=True)
    assert os.path.isfile(tmp_path / "cls" / "base" / "model.safetensors")
    base_keys = load_file(str(tmp_path / "cls" / "base" / "model.safetensors"))
    assert not any("base_layer" in k or k.endswith("::A") for k in base_keys)  # the plain base, experts unwrapped
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert isinstance(loaded, ImplicitMoEForSequenceClassification)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=0, rtol=0)


def test_push_and_load_through_the_test_hub(base_dir, experts, tmp_path, hub_server):
    _, updates = experts
    api = HfApi(endpoint=hub_server.endpoint)
    api.create_repo("test/tiny-base", exist_ok=True)
    api.upload_folder(repo_id="test/tiny-base", folder_path=base_dir)
    models, _ = experts
    models[1].save_pretrained(tmp_path / "adapter1")
    api.create_repo("test/adapter1", exist_ok=True)
    api.upload_folder(repo_id="test/adapter1", folder_path=str(tmp_path / "adapter1"))
    moe = ImplicitMoEForCausalLM.from_adapters(
        load_base(base_dir), adapters=[updates[0], "test/adapter1"], router_top_k=3, endpoint=hub_server.endpoint
    )
    assert moe.config.experts[1]["members"][0]["source"] == "test/adapter1"
    local = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=updates[:2], router_top_k=3)
    torch.testing.assert_close(logits(moe, task_batch(1, seed=2)), logits(local, task_batch(1, seed=2)), atol=0, rtol=0)
    moe.config.base_model_name_or_path = "test/tiny-base"  # the base as users will find it on the Hub
    moe.save_pretrained(tmp_path / "moe")
    api.create_repo("test/tiny-moe", exist_ok=True)
    api.upload_folder(repo_id="test/tiny-moe", folder_path=str(tmp_path / "moe"))
    batch = task_batch(2, seed=1)
    save_file({"input_ids": batch["input_ids"], "logits": logits(moe, batch)}, str(tmp_path / "ref.safetensors"))
    script = f"""
        import torch
        from safetensors.torch import load_file
        from huggingface_hub import HfApi
        from transformers import AutoModelForCausalLM
        import moe_router
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained("test/tiny-moe")
        assert isinstance(model, moe_router.ImplicitMoEForCausalLM)
        with torch.no_grad():
            first = float((model(input_ids=ref["input_ids"]).logits - ref["logits"]).abs().max())
        model.save_pretrained("with-base", save_base=True)
        HfApi().create_repo("test/tiny-moe-with-base", exist_ok=True)
        HfApi().upload_folder(repo_id="test/tiny-moe-with-base", folder_path="with-base")
        again = moe_router.ImplicitMoEForCausalLM.from_pretrained("test/tiny-moe-with-base")
        assert again.config.base_in_repo
        with torch.no_grad():
            second = float((again(input_ids=ref["input_ids"]).logits - ref["logits"]).abs().max())
        print(first, second)
    """
    env = dict(os.environ, HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_XET="1")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (float(v) for v in done.stdout.split()[-2:])
    assert first == 0.0 and second == 0.0
    files = {f.rfilename for f in api.model_info("test/tiny-moe-with-base").siblings}
    assert {"config.json", "experts.safetensors", "base/model.safetensors"} <= files


def test_push_to_hub_with_transformers_model_card(base_dir, experts, tmp_path, hub_server):
    _, updates = experts
    moe = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=updates[:1])
    moe.save_pretrained(tmp_path / "moe")
    script = f"""
        import moe_router
        model = moe_router.ImplicitMoEForCausalLM.from_pretrained({str(tmp_path / "moe")!r})
        model.push_to_hub("test/pushed", save_base=True)
        again = moe_router.ImplicitMoEForCausalLM.from_pretrained("test/pushed")
        assert again.config.base_in_repo and not model.config.base_in_repo
        print(type(again).__name__)
    """
    env = dict(os.environ, HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_XET="1")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "ImplicitMoEForCausalLM"


# --------------------------------------------------------------------------------------------------- baselines
def test_lora_exports_are_exact_and_feed_peft_arrow(base_dir, experts, tmp_path):
    _, updates = experts
    calibration = {t: [task_batch(t, seed=0)] for t in range(2)}
    moe = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=updates[:2], calibration=calibration)
    batch = task_batch(1, seed=6)
    paths = export_loras(moe, tmp_path / "loras")
    for e, path in enumerate(paths):
        lora = PeftModel.from_pretrained(load_base(base_dir), str(path))
        with comparison_mode(moe, "oracle"):
            expected = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], expert_ids=e).logits
        torch.testing.assert_close(logits(lora, batch), expected.detach(), atol=1e-5, rtol=0)
    single = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=[updates[2]])
    arrow_single = arrow_model(load_base(base_dir), [export_lora(single, 0, tmp_path / "single")], top_k=1)
    with comparison_mode(single, "sum"):
        torch.testing.assert_close(logits(arrow_single, batch), logits(single, batch), atol=1e-5, rtol=0)
    arrow = arrow_model(load_base(base_dir), paths, top_k=1)
    out = logits(arrow, batch)
    assert out.shape == (4, 12, VOCAB) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------ errors
def test_bad_configurations_fail_clearly(base_dir, experts, tmp_path):
    _, updates = experts
    for k in (0, -2):
        with pytest.raises(ValueError, match="router_top_k must be a positive integer"):
            ImplicitMoEConfig(router_top_k=k)
        with pytest.raises(ValueError, match="router_top_k must be a positive integer"):
            ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=[updates[0]], router_top_k=k)
    with pytest.raises(ValueError, match="router must be one of"):
        ImplicitMoEConfig(routing="learned")
    with pytest.raises(ValueError, match="refine='task_stats' needs calibration"):
        ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=[updates[0]], refine="task_stats")
    # experts for another base model: by name and by shape
    wider = LlamaForCausalLM(tiny_config(hidden_size=96, num_attention_heads=4))
    with pytest.raises(ValueError, match="shaped for .* base layer is"):
        ImplicitMoEForCausalLM.from_adapters(wider, adapters=[updates[0]], check_base_model=False)
    wider.config._name_or_path = "someone/another-model"
    with pytest.raises(ValueError, match="was trained on base model"):
        ImplicitMoEForCausalLM.from_adapters(wider, adapters=[updates[0]])
    value_only = peft_sorlora.get_sparse_update(experts[0][0], round=1)
    with pytest.raises(ValueError, match="value-only SparseUpdate"):
        ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=[value_only])
    # a saved model whose experts file does not fit its base
    moe = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=updates[:2])
    moe.save_pretrained(tmp_path / "moe")
    tensors = load_file(str(tmp_path / "moe" / "experts.safetensors"))
    key = "model.layers.0.self_attn.q_proj::B"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "moe" / "experts.safetensors"))
    with pytest.raises(ValueError, match="B must be"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config["router_top_k"] = 0
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="router_top_k must be a positive integer"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="expert id must be in"):
        with moe.routed(5):
            pass
    assert moe_router.ImplicitMoEForCausalLM is ImplicitMoEForCausalLM
