"""The experiment on the real bundled SmolLM2-135M and a real task from a pinned archive: 2 peers, 1 round, via the hub."""

from __future__ import annotations

import pytest

from sorlora.simulation.config import ExperimentConfig
from sorlora.simulation.runner import run_experiment

pytestmark = pytest.mark.slow


def test_two_peers_one_round_on_smollm2(tmp_path):
    cfg = ExperimentConfig(
        tasks=("word_polarity",),  # every question fits max_len=64 (scoring skips prompts that do not)
        methods=("lora", "solora"),
        peers=2,
        rounds=1,
        local_steps=2,
        batch_size=4,
        max_len=64,
        n_train=16,
        n_test=6,
        n_curve=2,
        s_max=0.2,
        eval_batch_size=8,
    )
    summary = run_experiment(cfg, tmp_path, progress=False)
    assert summary["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert summary["base_params"] > 100_000_000
    lora, solora = summary["methods"]["lora"], summary["methods"]["solora"]
    for res in (lora, solora):
        assert 0.0 <= res["accuracy"]["word_polarity"] <= 1.0
        assert res["n_test"] == {"word_polarity": 6}
        assert res["train_loss"][0] > 0
    # the two peers' payloads crossed the hub: both directions for dense LoRA; SO-LoRA sends only masked B values
    assert lora["bytes_transmitted"] > 0
    assert solora["params_updated"] < lora["params_updated"]
    assert solora["clusters"] == [[0, 1]], "two peers at sparsity 0.25 collide at ~0.06 < s_max: one cluster"
    assert 0 < solora["bytes_transmitted"] < lora["bytes_transmitted"]
    assert "| solora |" in (tmp_path / "results.md").read_text()
