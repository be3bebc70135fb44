"""Routers of the implicit MoE (moe_router.routers): registry, config, storage, sequence/spectral routing, noise."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moe_router import (
    ROUTERS,
    ImplicitMoEConfig,
    ImplicitMoEForCausalLM,
    add_gaussian_noise,
    first_layer,
    gaussian_sigma,
    kmeans,
    routing_diagnostics,
    sequence_centroids,
)
from moe_router.layer import ImplicitMoELinear
from moe_router.routers import SpectralRouter
from tests.test_moe_router import R, base_dir, experts, load_base, task_batch  # noqa: F401 (fixtures)

TASKS = (0, 1)


def prompts(task: int, seed: int, batch: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    b = task_batch(task, seed=seed, batch=batch, length=length)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def centroids_for(base_dir: str, pool_layer: str | None = None) -> tuple[list[torch.Tensor], str]:  # noqa: F811
    base = load_base(base_dir)
    pool = pool_layer or first_layer(base, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
    data = {t: [prompts(t, seed=s) for s in range(3)] for t in TASKS}
    return [sequence_centroids(base, data[t], pool_layer=pool, k=2, seed=0) for t in TASKS], pool


@pytest.fixture(scope="module")
def moe_parts(base_dir, experts):  # noqa: F811
    _, updates = experts
    cents, pool = centroids_for(base_dir)
    calibration = {t: [task_batch(t, seed=0)] for t in TASKS}
    return updates[:2], cents, pool, calibration


def build(base_dir, moe_parts, **kwargs) -> ImplicitMoEForCausalLM:  # noqa: F811
    updates, cents, _, calibration = moe_parts
    kwargs.setdefault("router_top_k", R)
    return ImplicitMoEForCausalLM.from_adapters(
        load_base(base_dir), adapters=updates, calibration=calibration, centroids=cents, **kwargs
    )


def run(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


# ------------------------------------------------------------------------------------------------------ registry
def test_unknown_router_and_bad_options_fail_clearly(base_dir, moe_parts):  # noqa: F811
    names = r"\['average', 'hard', 'implicit', 'sequence', 'spectral', 'sum'\]"
    with pytest.raises(ValueError, match=f"router must be one of {names}.*got 'learned'"):
        ImplicitMoEConfig(router="learned")
    with pytest.raises(ValueError, match="router must be one of"):
        ImplicitMoEConfig(routing="learned")
    with pytest.raises(ValueError, match="disagree"):
        ImplicitMoEConfig(router="sum", routing="implicit")
    with pytest.raises(ValueError, match=r"router 'sequence' has no options \['chose'\]"):
        ImplicitMoEConfig(router_options={"sequence": {"chose": 2}})
    with pytest.raises(ValueError, match="granularity must be one of"):
        ImplicitMoEConfig(router_options={"spectral": {"granularity": "word"}})
    assert ImplicitMoEConfig(routing="oracle").router == "hard"  # the old name still loads
    moe = build(base_dir, moe_parts)
    with pytest.raises(ValueError, match="router must be one of"):
        moe.set_router(router="learned")
    with pytest.raises(ValueError, match="choose=3 but only 2 experts"):
        moe.set_router(router="sequence", options={"choose": 3})
    assert moe.config.router == "implicit" and moe.router.impl.name == "implicit"  # a failed change changes nothing
    # the sequence router without centroids, and centroids of the wrong width
    bare = ImplicitMoEForCausalLM.from_adapters(load_base(base_dir), adapters=moe_parts[0])
    with pytest.raises(ValueError, match=r"router 'sequence' needs \['centroids', 'centroid_mask'\]"):
        bare.set_router(router="sequence")
    with pytest.raises(ValueError, match="centroids have 5 features but the pooled input"):
        bare.set_centroids([torch.randn(2, 5), torch.randn(1, 5)])
    assert "centroids" not in bare.router.tensors  # rolled back
    kept = moe.router.tensors["centroids"].clone()
    with pytest.raises(ValueError, match="one d for every expert"):
        moe.set_centroids([torch.randn(2, 64), torch.randn(2, 5)])
    with pytest.raises(ValueError, match="pool_layer 'model.nope' is neither"):
        moe.set_centroids([torch.randn(2, 64), torch.randn(2, 64)], pool_layer="model.nope")
    assert torch.equal(moe.router.tensors["centroids"], kept) and "sequence" not in moe.config.router_options


# ------------------------------------------------------------------------------- implicit unchanged (old code path)
def _old_forward(self: ImplicitMoELinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """ImplicitMoELinear.forward and keep_mask as they were before the router registry (verbatim logic)."""
    result = self.base_layer(x, *args, **kwargs)
    a = self.projection()
    h = F.linear(x.to(a.dtype), a)
    router_h = F.linear(x.to(a.dtype), self.projection(refined=True)) if self.router.refine == "routing" else h
    keep = None
    state = self.router
    if state.routing == "implicit":
        k = state.top_k
        if k is not None and k < router_h.shape[-1]:
            index = router_h.abs().topk(k, dim=-1).indices
            keep = torch.zeros_like(router_h, dtype=torch.bool).scatter_(-1, index, True)
    elif state.routing == "hard":
        ids = torch.as_tensor(state.expert_ids).long().flatten().view(-1, *([1] * (h.ndim - 1)))
        keep = (self.expert == ids).expand_as(h)
    if keep is not None:
        h = h * keep
    scale = self.scale / self.router.num_experts if self.router.routing == "average" else self.scale
    return result + F.linear(h * scale, self.B).to(result.dtype)


@pytest.mark.parametrize("refine", ["routing", "task_stats", "none"])
def test_implicit_sum_average_hard_are_bit_identical_to_the_old_code_path(base_dir, moe_parts, refine, monkeypatch):  # noqa: F811
    moe = build(base_dir, moe_parts, refine=refine, router_top_k=3)
    batch = prompts(1, seed=20)
    ids = torch.tensor([0, 1, 1, 0])
    new = {}
    for name in ("implicit", "sum", "average", "hard"):
        with moe.router_settings(router=name):
            new[name] = run(moe, batch, expert_ids=ids if name == "hard" else None)
    assert (new["implicit"] - new["sum"]).abs().max() > 1e-4  # top-3 of 8 components is not the sum
    monkeypatch.setattr(ImplicitMoELinear, "forward", _old_forward)
    for name in ("implicit", "sum", "average", "hard"):
        with moe.router_settings(router=name):
            assert torch.equal(run(moe, batch, expert_ids=ids if name == "hard" else None), new[name]), name


# ------------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_selectable_saved_and_restored(base_dir, moe_parts, name, tmp_path):  # noqa: F811
    moe = build(base_dir, moe_parts, router=name)
    assert moe.config.router == name and moe.router.impl.name == name and moe.config.routing == name
    mixed = {
        k: torch.cat([prompts(0, seed=30)[k][:2], prompts(1, seed=30)[k][:2]]) for k in ("input_ids", "attention_mask")
    }
    mixed["attention_mask"][1, :3] = 0  # left padding on one row
    extra = {"expert_ids": torch.tensor([0, 0, 1, 1])} if name == "hard" else {}
    expected = run(moe, mixed, **extra)
    choices = moe.routing_choices()
    assert torch.isfinite(expected).all()
    moe.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert isinstance(loaded, ImplicitMoEForCausalLM) and loaded.config.router == name
    assert torch.equal(loaded.router.tensors["centroids"], moe.router.tensors["centroids"])
    assert torch.equal(run(loaded, mixed, **extra), expected)
    again = loaded.routing_choices()
    assert again.keys() == choices.keys() and all(torch.equal(again[k], choices[k]) for k in choices)
    if name in ("sequence", "spectral"):
        assert choices  # per-sequence routers store their choice
    if name == "sequence":
        assert choices["sequence"].flatten().tolist() == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------------- sequence
def test_sequence_router_sends_every_prompt_to_its_tasks_cluster(base_dir, moe_parts):  # noqa: F811
    moe = build(base_dir, moe_parts, router="sequence")
    examples = [(prompts(t, seed=100 + s), [t] * 4) for t in TASKS for s in range(3)]
    diag = routing_diagnostics(moe, examples, {0: 0, 1: 1})
    assert diag.accuracy == {0: 1.0, 1: 1.0} and diag.own_share == {0: 1.0, 1: 1.0}
    assert diag.confusion.tolist() == [[12, 0], [0, 12]] and diag.router == "sequence"
    # the paper's router on the same prompts, for contrast (its selection is per token: shares below 1)
    with moe.router_settings(router="implicit"):
        implicit = routing_diagnostics(moe, examples, {0: 0, 1: 1})
    assert all(v < 1.0 for v in implicit.own_share.values())
    assert implicit.confusion.sum() == 24
    # with every component of the chosen cluster kept, the sequence router is hard routing by the predicted cluster
    batch = {k: torch.cat([prompts(0, seed=40)[k], prompts(1, seed=40)[k]]) for k in ("input_ids", "attention_mask")}
    with moe.router_settings(router="sequence", top_k=None):
        routed = run(moe, batch)
    with moe.router_settings(router="hard", top_k=None):
        hard = run(moe, batch, expert_ids=torch.tensor([0] * 4 + [1] * 4))
    assert torch.equal(routed, hard)
    with moe.router_settings(router="hard"):
        hard_wrong = run(moe, batch, expert_ids=torch.tensor([1] * 4 + [0] * 4))
    assert (routed - hard_wrong).abs().max() > 1e-4  # the test can tell the clusters apart


def test_sequence_router_with_embeddings_pool(base_dir, moe_parts):  # noqa: F811
    cents, pool = centroids_for(base_dir, pool_layer="embeddings")
    assert pool == "embeddings"
    moe = build(base_dir, moe_parts, router="sequence", router_options={"sequence": {"pool_layer": "embeddings"}})
    moe.set_centroids(cents)
    examples = [(prompts(t, seed=200), [t] * 4) for t in TASKS]
    assert routing_diagnostics(moe, examples, {0: 0, 1: 1}).accuracy == {0: 1.0, 1: 1.0}


def test_sequence_router_keeps_its_choice_while_generating(base_dir, moe_parts):  # noqa: F811
    moe = build(base_dir, moe_parts, router="sequence", router_top_k=None)
    impl = moe.router.impl
    calls = []
    original = impl.choose
    impl.choose = lambda pooled: calls.append(pooled.shape[0]) or original(pooled)
    batch = {
        k: torch.cat([prompts(1, seed=50)[k][:2], prompts(0, seed=50)[k][:1]]) for k in ("input_ids", "attention_mask")
    }
    kept_experts = []

    def record(expert, keep, h):
        if h.shape[1] == 1:  # decode steps: one new token per sequence
            kept_experts.append([sorted(set(expert[keep[b, 0]].tolist())) for b in range(h.shape[0])])

    with moe.recording(record):
        out = moe.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert calls == [3]  # one choice at prefill for the 3 sequences; the 4 decode steps reuse it
    assert moe.routing_choices()["sequence"].flatten().tolist() == [1, 1, 0]
    assert kept_experts and all(step == [[1], [1], [0]] for step in kept_experts)
    # the same tokens as hard routing by those clusters through the whole generation
    with moe.router_settings(router="hard"):
        hard = moe.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0, expert_ids=[1, 1, 0])
    assert torch.equal(out, hard)
    # a decode step whose batch does not match the routed prompt fails clearly
    with torch.no_grad():
        first = moe.model(**batch, use_cache=True)
        with pytest.raises(ValueError, match="the prompt routed 3 sequences, this decode step has 1"):
            moe.model(input_ids=batch["input_ids"][:1, -1:], past_key_values=first.past_key_values)


# ------------------------------------------------------------------------------------------------- spectral
def test_spectral_scores_are_the_norm_of_each_experts_update(base_dir, moe_parts):  # noqa: F811
    moe = build(base_dir, moe_parts, router="spectral")
    impl = moe.router.impl
    assert isinstance(impl, SpectralRouter)
    x = torch.randn(3, 7, 64)
    for layer in moe.expert_layers().values():
        scores = impl.scores(layer, x)
        assert scores.shape == (3, 7, 2) and torch.isfinite(scores).all() and (scores >= 0).all()
        for e in range(2):
            chosen = layer.expert == e
            delta = (layer.B[:, chosen] * layer.scale[chosen]) @ layer.A[chosen]
            direct = (x @ delta.T).norm(dim=-1) / x.norm(dim=-1)
            torch.testing.assert_close(scores[..., e], direct, atol=1e-5, rtol=1e-4)
            top = torch.linalg.svd(delta)
            assert impl.scores(layer, top.Vh[0])[e].item() == pytest.approx(top.S[0].item(), rel=1e-4)
    with moe.router_settings(options={"rank": 1}):
        layer = next(iter(moe.expert_layers().values()))
        assert (moe.router.impl.scores(layer, x) <= impl.scores(layer, x) + 1e-5).all()
    batch = prompts(0, seed=60)
    routed = run(moe, batch)
    choices = moe.routing_choices()
    assert set(choices) == {f"spectral:{k}" for k in moe.expert_layers()}
    assert all(c.shape == (4, 1) for c in choices.values())
    with moe.router_settings(options={"granularity": "token"}):
        per_token = run(moe, batch)
        assert moe.routing_choices() == {}
    assert torch.isfinite(per_token).all() and torch.isfinite(routed).all()
    out = moe.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 13)


# ---------------------------------------------------------------------------------------------- centroids, noise
def test_kmeans_is_deterministic_and_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0, 0]) + 0.05 * torch.randn(20, 3, generator=g)
    b = torch.tensor([0, 1.0, 0]) + 0.05 * torch.randn(20, 3, generator=g)
    points = torch.cat([a, b])
    c1, assign = kmeans(points, 2, seed=3)
    c2, _ = kmeans(points, 2, seed=3)
    assert torch.equal(c1, c2)
    assert len(set(assign[:20].tolist())) == 1 and len(set(assign[20:].tolist())) == 1 and assign[0] != assign[20]
    torch.testing.assert_close(c1.norm(dim=-1), torch.ones(2))
    assert kmeans(points[:3], 4)[0].shape == (3, 3)  # never more centroids than points


def test_gaussian_noise_has_the_documented_sigma():
    sigma = gaussian_sigma(0.5, 1e-5, 2.0)
    assert sigma == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5)
    assert sigma == pytest.approx(19.38, abs=0.01)
    centroids = torch.zeros(4000, 50)
    centroids[:, 0] = 10.0  # norm 10, clipped to 2
    noisy = add_gaussian_noise(centroids, 0.5, 1e-5, 2.0, generator=torch.Generator().manual_seed(0))
    assert noisy[:, 1:].std().item() == pytest.approx(sigma, rel=0.01)
    assert noisy[:, 0].mean().item() == pytest.approx(2.0, abs=4 * sigma / math.sqrt(4000))
    for bad in ({"epsilon": 0}, {"delta": 1.0}, {"clip_norm": -1}):
        kwargs = {"epsilon": 1.0, "delta": 1e-5, "clip_norm": 1.0, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            gaussian_sigma(**kwargs)


def test_noisy_centroids_still_route_at_a_generous_epsilon(base_dir, moe_parts):  # noqa: F811
    _, _, pool, _ = moe_parts
    base = load_base(base_dir)
    noisy = [
        sequence_centroids(
            base,
            [prompts(t, seed=s) for s in range(3)],
            pool_layer=pool,
            k=1,
            epsilon=200.0,
            generator=torch.Generator().manual_seed(t),
        )  # fmt: skip
        for t in TASKS
    ]
    moe = build(base_dir, moe_parts, router="sequence")
    clean = moe.router.tensors["centroids"].clone()
    moe.set_centroids(noisy)
    assert not torch.equal(moe.router.tensors["centroids"][:, :1], clean[:, :1])
    examples = [(prompts(t, seed=300), [t] * 4) for t in TASKS]
    assert routing_diagnostics(moe, examples, {0: 0, 1: 1}).accuracy == {0: 1.0, 1: 1.0}


def test_sequence_router_travels_as_remote_code(base_dir, moe_parts, tmp_path):  # noqa: F811
    """Saved with its centroids, loaded with trust_remote_code and without moe_router: same choices, same logits."""
    moe = build(base_dir, moe_parts, router="sequence")
    batch = {
        k: torch.cat([prompts(0, seed=70)[k][:2], prompts(1, seed=70)[k][:2]]) for k in ("input_ids", "attention_mask")
    }
    expected = run(moe, batch)
    moe.save_pretrained(tmp_path / "moe")
    assert "routers.py" in os.listdir(tmp_path / "moe")
    save_file({**batch, "logits": expected}, str(tmp_path / "ref.safetensors"))
    script = f"""
        import sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "moe")!r}, trust_remote_code=True)
        assert "moe_router" not in sys.modules and model.config.router == "sequence"
        with torch.no_grad():
            out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
        print(model.routing_choices()["sequence"].flatten().tolist(), float((out - ref["logits"]).abs().max()))
    """
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 1, 1] 0.0"


def test_sequence_moe_pushed_to_a_hub_server_routes_as_in_memory(base_dir, moe_parts, tmp_path, hub_server):  # noqa: F811
    """Pushed to a Hub-compatible server over HTTP and loaded with AutoModelForCausalLM in another process: every
    prompt goes to the same cluster as in memory, with the same logits (issue 21's Hub round trip)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint)
    api.create_repo("test/tiny-base", exist_ok=True)
    api.upload_folder(repo_id="test/tiny-base", folder_path=base_dir)
    moe = build(base_dir, moe_parts, router="sequence")
    moe.config.base_model_name_or_path = "test/tiny-base"  # the base as users find it on the hub
    batch = {k: torch.cat([prompts(0, seed=90)[k], prompts(1, seed=90)[k]]) for k in ("input_ids", "attention_mask")}
    expected = run(moe, batch)
    chosen = moe.routing_choices()["sequence"].flatten().tolist()
    assert chosen == [0] * 4 + [1] * 4, "in memory, every prompt goes to its task's cluster"
    moe.save_pretrained(tmp_path / "moe")
    api.create_repo("test/sequence-moe", exist_ok=True)
    api.upload_folder(repo_id="test/sequence-moe", folder_path=str(tmp_path / "moe"))
    save_file({**batch, "logits": expected}, str(tmp_path / "ref.safetensors"))
    script = f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        import moe_router
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained("test/sequence-moe")
        assert isinstance(model, moe_router.ImplicitMoEForCausalLM) and model.config.router == "sequence"
        with torch.no_grad():
            out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
        print(model.routing_choices()["sequence"].flatten().tolist(), float((out - ref["logits"]).abs().max()))
    """
    env = dict(os.environ, HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_XET="1")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"{chosen} 0.0"
