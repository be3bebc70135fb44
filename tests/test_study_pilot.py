"""The task pilot: zero-shot vs own-task fine-tuned accuracy on validation questions only; truncation reported."""

from __future__ import annotations

import json

from sorlora.cli import main
from sorlora.study.pilot import run_pilot

from .test_simulation_runner import TINY


def test_pilot_keeps_tasks_that_learn_on_validation_only(tmp_path):
    cfg = TINY.replace(n_validation=8, rounds=2, local_steps=6, n_train=32, lr={**TINY.lr, "local": 5e-2})
    result = run_pilot(cfg, tmp_path, tasks=("synthetic-alpha", "synthetic-beta"), margin=-1.0, progress=False)
    assert set(result["tasks"]) == {"synthetic-alpha", "synthetic-beta"}
    for name, row in result["tasks"].items():
        assert row["n_validation"] == 8 and row["n_scored"] == 8
        assert 0 <= row["zero_shot"] <= 1 and 0 <= row["tuned"] <= 1
        assert row["gain"] == row["tuned"] - row["zero_shot"] and row["gain_low"] <= row["gain"] <= row["gain_high"]
        assert row["truncation"]["test"]["n"] == cfg.n_test and row["truncation"]["validation"]["n"] == 8
        trial = json.loads((tmp_path / name / "results.json").read_text())
        assert trial["methods"]["local"]["n_test"] == {name: 8}, "fine-tuned model scored on validation questions"
        assert row["kept"] == (row["gain_low"] > 0)  # margin -1: only the interval decides
    assert json.loads((tmp_path / "pilot.json").read_text())["kept"] == result["kept"]
    table = (tmp_path / "pilot.md").read_text()
    assert "synthetic-alpha" in table and "gain [95% CI]" in table


def test_pilot_drops_a_task_whose_questions_do_not_fit(tmp_path):
    cfg = TINY.replace(n_validation=4, max_len=12)
    result = run_pilot(cfg, tmp_path, tasks=("synthetic-alpha",), progress=False)
    row = result["tasks"]["synthetic-alpha"]
    assert not row["kept"] and "do not fit max_len" in row["reason"] and result["kept"] == []
    assert row["truncation"]["validation"]["truncated"] == 4


def test_cli_pilot(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.replace(n_validation=4, rounds=1).to_dict()))
    code = main(["pilot", "--config", str(config), "--tasks", "synthetic-alpha", "--margin", "0.5", "--run-dir",
                 str(tmp_path / "p"), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Task pilot" in out and "synthetic-alpha" in out
    assert code == (0 if json.loads((tmp_path / "p" / "pilot.json").read_text())["kept"] else 1)
