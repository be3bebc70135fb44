"""Learning rates are chosen on validation questions, never on the test split."""

from __future__ import annotations

import json

import pytest

from sorlora.cli import main
from sorlora.simulation.setup import load_tasks
from sorlora.study.tuning import tune_learning_rates

from .test_simulation_runner import TINY


def test_tune_lr_scores_every_candidate_on_validation_only(tmp_path):
    cfg = TINY.replace(n_validation=5, methods=("local", "lori"))
    tasks = load_tasks(cfg)
    for task in tasks.values():
        assert not {e.prompt for e in task.validation} & {e.prompt for e in task.test}
    result = tune_learning_rates(cfg, tmp_path, grid=[1e-3, 5e-2], progress=False)
    assert set(result["scores"]) == {"local", "lori"}
    for method, scores in result["scores"].items():
        assert set(scores) == {"0.001", "0.05"}
        assert result["best"][method] in (1e-3, 5e-2)
        assert scores[f"{result['best'][method]:g}"] == max(scores.values())
    stored = json.loads((tmp_path / "best_lr.json").read_text())
    assert stored["best"] == result["best"]
    trial = json.loads((tmp_path / "local" / "lr-0.001" / "results.json").read_text())
    assert trial["methods"]["local"]["n_test"] == {t: 5 for t in cfg.tasks}, "scored on the 5 validation questions"


def test_tune_lr_without_validation_questions_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_validation"):
        tune_learning_rates(TINY.replace(n_validation=0), tmp_path, grid=[1e-3])


def test_cli_tune_lr(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.replace(n_validation=4, methods=("local",)).to_dict()))
    code = main(["tune-lr", "--config", str(config), "--grid", "0.001,0.01", "--run-dir", str(tmp_path / "t"),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "local" in out and "-> best" in out and "--set lr=" in out


def test_tune_lr_works_for_every_method(tmp_path):
    """Every method, solora included (it crashed: the router choice read the emptied validation split)."""
    from sorlora.methods.specs import METHODS

    cfg = TINY.replace(n_validation=4, rounds=1)
    result = tune_learning_rates(cfg, tmp_path, grid=[1e-2], progress=False)
    assert set(result["best"]) == set(METHODS) == set(cfg.methods)
    for method in METHODS:
        trial = json.loads((tmp_path / method / "lr-0.01" / "results.json").read_text())
        assert trial["methods"][method]["n_test"] == {t: 4 for t in cfg.tasks}
        assert 0 <= result["scores"][method]["0.01"] <= 1
