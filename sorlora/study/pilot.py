"""The task pilot (``sorlora pilot``): keep the tasks that carry signal, judged on validation questions only.

For each candidate task, the base model's zero-shot validation accuracy against one peer fine-tuned on that task
alone (the ``local`` method, one peer), with the run's rounds and steps. A task is kept when fine-tuning beats the
base by at least ``margin`` and the 95% interval of the gain excludes zero; prompts that do not fit ``max_len`` are
measured and reported, and a task whose validation questions do not fit is dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

from ..atomic import write_json
from ..data.examples import Task
from ..data.registry import OFFLINE_TASKS, load_task
from ..evaluation.scoring import evaluate, truncation_report
from ..simulation.config import ExperimentConfig
from ..simulation.runner import Runner
from ..simulation.setup import load_model
from .tuning import validation_tasks

__all__ = ["PILOT_CANDIDATES", "pilot_table", "run_pilot"]

# Every registered task whose data installs from the package registry (sorlora.data.sources.SOURCES).
PILOT_CANDIDATES: tuple[str, ...] = OFFLINE_TASKS


def _gain_interval(base: float, tuned: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Interval of a difference of two accuracies on the same n questions, treated as unpaired (conservative)."""
    se = math.sqrt((base * (1 - base) + tuned * (1 - tuned)) / n) if n else float("nan")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return tuned - base - z * se, tuned - base + z * se


def run_pilot(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    tasks: Sequence[str],
    margin: float = 0.1,
    max_truncated: float = 0.05,
    progress: bool = True,
) -> dict[str, Any]:
    """Which of ``tasks`` learn: zero-shot vs own-task fine-tuned accuracy on validation questions (never test).

    Needs ``cfg.n_validation > 0``. Each task's fine-tuning is an ordinary resumable run (one peer, ``local``)
    under ``run_dir/<task>``; results go to ``run_dir/pilot.json`` and ``pilot.md``. Returns ``{"tasks": {name:
    row}, "kept": [names], ...}`` where a row holds zero_shot, tuned, gain, its interval, truncation and seconds.
    """
    if cfg.n_validation <= 0:
        raise ValueError("the pilot needs validation questions: set n_validation > 0 (e.g. --set n_validation=60)")
    if not tasks:
        raise ValueError("the pilot needs at least one candidate task")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, base_id = base = load_model(cfg)
    kw = cfg.eval_kwargs()
    rows: dict[str, dict[str, Any]] = {}

    def write() -> dict[str, Any]:  # after every task, so a stopped pilot keeps what it measured
        result = {"config": cfg.to_dict(), "margin": margin, "max_truncated": max_truncated, "tasks": rows,
                  "kept": [n for n, r in rows.items() if r["kept"]]}  # fmt: skip
        write_json(run_dir / "pilot.json", result)
        (run_dir / "pilot.md").write_text("# Task pilot (validation questions only)\n\n" + pilot_table(result))
        return result

    for name in tasks:
        started = time.perf_counter()
        task = load_task(name, n_train=cfg.n_train, n_test=cfg.n_test, n_validation=cfg.n_validation, seed=cfg.seed)
        report = truncation_report({name: task}, tokenizer, max_len=cfg.max_len)[name]
        row: dict[str, Any] = {"kind": task.kind, "n_validation": len(task.validation), "truncation": report}
        rows[name] = row
        share = report["validation"]["truncated"] / max(report["validation"]["n"], 1)
        if share > max_truncated:
            row.update(kept=False, reason=f"{100 * share:.0f}% of validation questions do not fit max_len")
            continue
        (val,) = validation_tasks({name: task}).values()
        zero = evaluate(model, tokenizer, val, **kw)
        trial = cfg.replace(tasks=(name,), methods=("local",), peers=1, n_validation=0)
        runner = Runner(trial, run_dir / _safe(name), progress=progress, base=base, tasks={name: val})
        summary = runner.run()
        base = (runner.base, tokenizer, base_id)
        model = runner.base
        tuned = summary["methods"]["local"]["accuracy"][name]
        low, high = _gain_interval(zero["accuracy"], tuned, zero["n"])
        kept = tuned - zero["accuracy"] >= margin and low > 0
        row.update(
            zero_shot=zero["accuracy"],
            zero_shot_norm=zero["acc_norm"],
            tuned=tuned,
            gain=tuned - zero["accuracy"],
            gain_low=low,
            gain_high=high,
            n_scored=zero["n"],
            majority=_majority_share(val),
            kept=kept,
            reason="learns" if kept else f"gain below {100 * margin:.0f} points or its interval includes 0",
            seconds=time.perf_counter() - started,
        )
        write()
    return write()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]


def _majority_share(task: Task) -> float:
    labels = [e.label for e in task.test]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def pilot_table(result: dict[str, Any]) -> str:
    """Markdown table of a pilot: per task zero-shot and fine-tuned validation accuracy, gain with its interval."""
    lines = [
        "| task | kind | validation questions (scored) | truncated test / val / train | majority label | zero-shot "
        "acc (acc_norm) | fine-tuned acc | gain [95% CI] | kept | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["tasks"].items():
        t = row["truncation"]
        cut = " / ".join(f"{t[s]['truncated']}/{t[s]['n']}" for s in ("test", "validation", "train"))
        if "tuned" not in row:
            lines.append(f"| {name} | {row['kind']} | {row['n_validation']} | {cut} | — | — | — | — | no: "
                         f"{row['reason']} | — |")  # fmt: skip
            continue
        lines.append(
            f"| {name} | {row['kind']} | {row['n_validation']} ({row['n_scored']}) | {cut} | "
            f"{100 * row['majority']:.0f}% | {100 * row['zero_shot']:.1f} ({100 * row['zero_shot_norm']:.1f}) | "
            f"{100 * row['tuned']:.1f} | {100 * row['gain']:+.1f} [{100 * row['gain_low']:+.1f}, "
            f"{100 * row['gain_high']:+.1f}] | {'**yes**' if row['kept'] else 'no'} | {row['seconds']:.0f} |"
        )
    cfg = result["config"]
    lines += [
        "",
        f"Fine-tuned = one peer trained on the task alone (`local`), {cfg['rounds']} rounds × {cfg['local_steps']} "
        f"steps, batch {cfg['batch_size']}, lr {cfg['lr']['local']:g}, max_len {cfg['max_len']}, seed {cfg['seed']}. "
        f"Kept: gain ≥ {100 * result['margin']:.0f} points and its 95% interval (unpaired, conservative) above 0. "
        f"Kept tasks: {', '.join(result['kept']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"
