"""The pre-flight of ``sorlora run | study | pilot | tune-lr --dry-run``: everything a run needs, checked, no training.

:func:`fetch_tasks` fetches and splits every task (a data source that cannot be fetched fails here, before any model
loads); :func:`dry_run` then loads the model and reports, per task, its source, split sizes and the questions that do
not fit ``max_len``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..data.examples import Task
from ..data.registry import TASKS
from ..simulation.config import ExperimentConfig

__all__ = ["fetch_tasks", "dry_run", "add_dry_run_argument"]


def add_dry_run_argument(parser: argparse.ArgumentParser) -> None:
    """``--dry-run`` for ``run``, ``tune-lr``, ``study`` and ``pilot``."""
    parser.add_argument("--dry-run", action="store_true",
                        help="the whole pre-flight (settings, every task fetched, split and checked against max_len, "
                        "the model loaded), then exit 0 without training")  # fmt: skip


def fetch_tasks(cfg: ExperimentConfig, names: Sequence[str] | None = None) -> dict[str, Task]:
    """``names`` (default: ``cfg.tasks``) with the run's fixed splits; fetches every data source they need."""
    from ..simulation.setup import load_tasks  # noqa: PLC0415 - imports torch: `sorlora --help` stays fast

    return load_tasks(cfg if names is None else cfg.replace(tasks=tuple(names)))


def dry_run(cfg: ExperimentConfig, tasks: Mapping[str, Task], *, print_fn: Any = print) -> dict[str, Any]:
    """Load the model, check every task's questions against ``max_len``, print a table; train nothing.

    Returns ``{"model": id, "load_seconds": s, "tasks": {name: truncation report}}``.
    """
    from ..evaluation.scoring import truncation_report  # noqa: PLC0415 - imports torch
    from ..simulation.setup import load_model  # noqa: PLC0415

    started = time.perf_counter()
    _, tokenizer, base_id = load_model(cfg)
    seconds = time.perf_counter() - started
    report = truncation_report(tasks, tokenizer, max_len=cfg.max_len)
    print_fn(f"model {base_id}: loaded in {seconds:.1f} s")
    print_fn(f"{'task':<20} {'source':<18} {'train':>6} {'val':>5} {'test':>5}  too long for max_len={cfg.max_len}")
    for name, task in tasks.items():
        source = TASKS[name].source if name in TASKS else "file/synthetic"
        cut = "  ".join(f"{split} {r['truncated']}/{r['n']}" for split, r in report[name].items())
        print_fn(f"{name:<20} {source:<18} {len(task.train):>6} {len(task.validation):>5} {len(task.test):>5}  {cut}")
    print_fn("dry run: settings, data and model are ready; nothing was trained")
    return {"model": base_id, "load_seconds": seconds, "tasks": report}
