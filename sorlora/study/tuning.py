"""Learning rates chosen on a validation split, never on the test split (method.md §5).

Every candidate learning rate runs the method with the run's own settings; the "test" questions of these runs are
the tasks' validation questions (held out from training and disjoint from test), so the chosen rate is then used
by ``sorlora run --set lr=...`` without having looked at the test set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_json
from ..data.examples import Task
from ..simulation.config import ExperimentConfig
from ..simulation.runner import Runner
from ..simulation.setup import load_model, load_tasks

__all__ = ["tune_learning_rates", "validation_tasks"]


def validation_tasks(tasks: dict[str, Task]) -> dict[str, Task]:
    """The tasks with their validation questions as the test split (and no validation split of their own)."""
    return {name: dataclasses.replace(task, test=task.validation, validation=[]) for name, task in tasks.items()}


def tune_learning_rates(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    grid: Sequence[float],
    methods: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Validation accuracy of every (method, lr) in ``grid``; returns ``{"scores": ..., "best": {method: lr}}``.

    Needs ``cfg.n_validation > 0``. Each candidate is an ordinary (resumable) run under ``run_dir/<method>/lr-<lr>``
    whose test questions are the validation questions; the implicit MoE of ``solora`` uses the configured router
    settings there (choosing them would need a second held-out split).
    """
    if cfg.n_validation <= 0:
        raise ValueError("tuning needs validation questions: set n_validation > 0 (e.g. --set n_validation=24)")
    if not grid or any(lr <= 0 for lr in grid):
        raise ValueError(f"grid must hold positive learning rates, got {list(grid)}")
    methods = tuple(methods or cfg.methods)
    tasks = validation_tasks(load_tasks(cfg))
    base = load_model(cfg)
    run_dir = Path(run_dir)
    scores: dict[str, dict[str, float]] = {}
    for method in methods:
        scores[method] = {}
        for lr in grid:
            # The trial's "test" questions are the validation questions, so it has no validation split of its own:
            # n_validation=0 keeps the run from choosing router settings on an empty one (solora used to crash
            # here) and uses the configured router instead.
            trial = cfg.replace(methods=(method,), lr={**cfg.lr, method: float(lr)}, n_validation=0)
            runner = Runner(trial, run_dir / method / f"lr-{lr:g}", progress=progress, base=base, tasks=tasks)
            summary = runner.run()
            base = (runner.base, base[1], base[2])
            scores[method][f"{lr:g}"] = summary["methods"][method]["average"]
    best = {m: float(max(s, key=s.get)) for m, s in scores.items()}
    result = {"grid": [float(x) for x in grid], "scores": scores, "best": best}
    write_json(run_dir / "best_lr.json", result)
    return result
