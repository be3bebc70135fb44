"""The attack suite (sorlora/study/attacks.py) end to end on the tiny random Llama: one hostile member of four, its
table, its records, and what the robust rule saves of the honest members' accuracy; and one attack over hub-serve
(real HTTP, the huggingface_hub client, one token per user)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sorlora.study.attacks import (
    ATTACKS,
    SuiteSettings,
    attack_table,
    last_letter_task,
    lost_share,
    run_cell,
    run_suite,
    share_of_gain,
    summarise,
)

FAST = SuiteSettings(members=(4,), attacks=("pm9999",), rounds=4, n_test=128)


def test_lost_share_is_the_share_of_the_gain():
    assert lost_share(0.5, 0.9, 0.9) == 0.0
    assert lost_share(0.5, 0.9, 0.5) == pytest.approx(1.0)
    assert lost_share(0.5, 0.9, 0.7) == pytest.approx(0.5)
    assert lost_share(0.5, 0.5, 0.7) is None, "no gain, no share"


def test_share_of_gain_is_the_mean_loss_over_the_mean_gain_with_a_t_interval():
    got = share_of_gain([0.1, 0.0, 0.2], [0.4, 0.4, 0.4])
    half = 4.303 * 0.1 / 3**0.5  # t(0.975, 2 df) x sd / sqrt(n)
    assert got["mean"] == pytest.approx(0.25) and got["n"] == 3
    assert got["low"] == pytest.approx((0.1 - half) / 0.4, abs=1e-3) and got["high"] == pytest.approx(
        (0.1 + half) / 0.4, abs=1e-3
    )
    small = share_of_gain([0.05, 0.05], [0.5, 0.1])  # a seed that barely learned does not dominate
    assert small["mean"] == pytest.approx(0.05 / 0.3)
    assert share_of_gain([0.1], [0.3])["low"] is None, "one seed: no interval"
    assert share_of_gain([0.1, None], [-0.1, 0.2])["mean"] is None, "no positive mean gain, no share"


def _fake(seed, aggregation, attack, acc, base=0.5):
    return {"engine": "local", "members": 4, "aggregation": aggregation, "attack": attack, "seed": seed,
            "honest_accuracy": acc, "base_accuracy": base, "start_loss": 2.0, "final_loss": 1.0 if acc > 0.7 else 1.5,
            "crashed_honest": {}, "honest_rejected": 0, "updates_lost": 0, "records_about_hostile": 1,
            "reasons": ["norm clipped"], "examples": [{"action": "clipped", "reason": "norm 3 clipped to 1"}],
            "seconds": 1.0}  # fmt: skip


def test_the_summary_pairs_every_seed_with_its_own_clean_run():
    from sorlora.study.attacks import _shares

    # seed 0 learns a lot, seed 1 little; the attack costs 0.1 accuracy on each seed
    cells = [_fake(0, "clipped", "none", 0.9), _fake(0, "clipped", "noise", 0.8),
             _fake(1, "clipped", "none", 0.7), _fake(1, "clipped", "noise", 0.6),
             _fake(0, "mean", "none", 0.9), _fake(1, "mean", "none", 0.8)]  # fmt: skip
    _shares(cells)
    rows = {(r["aggregation"], r["attack"]): r for r in summarise(cells)}
    noise = rows[("clipped", "noise")]
    assert noise["lost"]["mean"] == pytest.approx(0.1 / 0.3) and noise["seeds"] == [0, 1]
    assert noise["lost"]["per_seed"] == pytest.approx([0.25, 0.5])
    assert noise["lost"]["low"] == pytest.approx(noise["lost"]["high"]), "the same loss on both seeds: no spread"
    cost = rows[("clipped", "none")]["robust_cost"]
    assert cost["mean"] == pytest.approx(0.05 / 0.35), "clipped's no-attack cost against mean, seed by seed"
    table = attack_table({"settings": {}, "cells": cells})
    assert "| local | 4 | noise |" in table and "33% [33, 33]" in table and "25 50" in table, table


def test_the_suite_task_is_balanced_and_learnable_by_its_last_letter():
    task = last_letter_task(n_train=200, n_test=100)
    labels = [e.label for e in task.test]
    assert 0.3 < sum(labels) / len(labels) < 0.7
    by_letter = {}
    for e in [*task.train, *task.test]:
        by_letter.setdefault(e.prompt[-1], set()).add(e.label)
    assert all(len(v) == 1 for v in by_letter.values()), "the last letter fixes the answer"


def test_one_hostile_of_four_with_pm9999_is_neutralised_by_clipped_and_erases_the_gain_under_mean(tmp_path):
    result = run_suite(FAST, tmp_path, progress=False)
    cells = {(c["aggregation"], c["attack"]): c for c in result["cells"]}
    assert set(cells) == {(a, x) for a in ("mean", "clipped") for x in ("none", "pm9999")}
    for c in cells.values():
        assert c["crashed_honest"] == {}, c["crashed_honest"]
        assert c["published"] == 3 if c["attack"] != "none" else c["published"] == 4
        assert c["honest_rejected"] == 0, c["honest_rejections"]  # no false positives
        assert c["updates_lost"] == 0
    clean = cells[("clipped", "none")]
    assert clean["honest_accuracy"] > clean["base_accuracy"] + 0.1, "the task moves accuracy"
    attacked = cells[("clipped", "pm9999")]
    assert attacked["records_about_hostile"] > 0 and attacked["reasons"], attacked
    assert all(e["reason"] and e["peer"] == "hostile/dev" for e in attacked["examples"])
    clipped, mean = attacked["lost_share"], cells[("mean", "pm9999")]["lost_share"]
    print(f"pm9999, 1 of 4: lost share clipped {clipped:.2f}, mean {mean:.2f}; no-attack cost "
          f"{clean['robust_cost']:.2f}")  # fmt: skip
    assert clipped < mean and mean > 0.5, (clipped, mean)
    on_disk = json.loads((tmp_path / "attacks.json").read_text())
    assert len(on_disk["cells"]) == 4 and (tmp_path / "attacks.png").stat().st_size > 0
    table = (tmp_path / "attacks.md").read_text()
    assert table == attack_table(on_disk) and "| local | 4 | pm9999 |" in table


def test_a_hostile_member_over_hub_serve_with_one_token_per_user_is_recorded_and_crashes_nobody(tmp_path):
    s = dataclasses.replace(FAST, rounds=2, local_steps=4, n_test=16)
    cell = run_cell(s, tmp_path, members=4, aggregation="clipped", attack="sign_flip", engine="hub-serve")
    assert cell["engine"] == "hub-serve" and cell["crashed_honest"] == {} and cell["published"] == 3
    assert cell["records_about_hostile"] > 0 and cell["honest_rejected"] == 0 and cell["updates_lost"] == 0


def test_every_attack_is_named_and_described():
    assert {"scaled10", "scaled100", "sign_flip", "noise", "pm9999", "weight_1e18", "dense_mask"} <= set(ATTACKS)
    assert all(a.help and (a.values or a.registration or a.dense) for a in ATTACKS.values())


def test_the_command_refuses_bad_input_in_one_line(capsys):
    from sorlora.cli import main

    for argv in (["--members", "2"], ["--attacks", "nope"], ["--aggregations", "krum"], ["--members", "x"]):
        assert main(["attacks", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "sorlora attacks" in err and "Traceback" not in err, err
