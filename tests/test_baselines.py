"""Fair baselines: dense LoRA with a shared A initialisation (lora-shared-a) next to the paper's lora."""

from __future__ import annotations

import torch

from sorlora.methods import METHOD_SPECS
from sorlora.model_loading import tiny_random_model
from sorlora.runner import run_experiment, terms_for
from sorlora.workspace import Workspace

from .test_experiment_runner import TINY


def _initial_a(method: str) -> list[dict[str, torch.Tensor]]:
    base, _ = tiny_random_model(seed=0)
    spec = METHOD_SPECS[method]
    terms = terms_for(TINY, method, base_model="tiny-random-llama", fingerprint="0" * 16)
    ws = Workspace(base, "tiny-random-llama", terms, spec.kind)
    for index in range(2):
        ws.add_adapter(f"peer{index:02d}", index)
    out = []
    for index in range(2):
        name = f"peer{index:02d}"
        out.append({k: v.detach().clone() for k, v in ws.model.named_parameters() if f"lora_A.{name}." in k})
    return out


def test_lora_shared_a_starts_every_peer_from_one_a_and_lora_does_not():
    shared = _initial_a("lora-shared-a")
    plain = _initial_a("lora")
    assert shared[0] and len(shared[0]) == len(shared[1])
    for (k0, a0), (_, a1) in zip(sorted(shared[0].items()), sorted(shared[1].items())):
        assert torch.equal(a0, a1), k0
    assert any(not torch.equal(a0, a1) for a0, a1 in zip(plain[0].values(), plain[1].values()))
    assert torch.equal(next(iter(plain[0].values())), next(iter(shared[0].values()))), "peer 0 draws the same A"


def test_lora_shared_a_runs_and_is_scored_per_question(tmp_path):
    summary = run_experiment(TINY.replace(methods=("lora-shared-a",), rounds=1), tmp_path, progress=False)
    result = summary["methods"]["lora-shared-a"]
    assert set(result["accuracy"]) == set(TINY.tasks) and result["bytes_transmitted"] > 0
    for task in TINY.tasks:
        assert len(result["per_question"][task]["correct"]) == TINY.n_test
