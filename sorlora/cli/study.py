"""``sorlora study`` and ``sorlora pilot``: the multi-seed study and the task pilot."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..data.registry import OFFLINE_TASKS as PILOT_CANDIDATES
from ..simulation.config import ExperimentConfig, apply_settings
from ..study.study import STUDY_PRESETS, StudySettings, run_study
from .preflight import add_dry_run_argument
from .quiet import no_library_progress_bars, quiet_library_warnings

__all__ = ["add_study_commands"]


def _settings_from_args(args: argparse.Namespace) -> StudySettings:
    if args.preset not in STUDY_PRESETS:
        raise ValueError(f"unknown study preset {args.preset!r}; choose from {sorted(STUDY_PRESETS)}")
    settings = STUDY_PRESETS[args.preset]
    cfg = ExperimentConfig.from_file(args.config) if args.config else settings.config
    cfg = apply_settings(cfg, args.set or [])  # the same typed --set as sorlora run
    seeds = tuple(int(s) for s in args.seeds.split(",")) if getattr(args, "seeds", None) else settings.seeds
    rerun = tuple(m for m in (getattr(args, "rerun", None) or "").split(",") if m)
    unknown = [m for m in rerun if m not in cfg.methods]
    if unknown:
        raise ValueError(f"--rerun {','.join(unknown)}: not a method of this study ({', '.join(cfg.methods)})")
    jobs = settings.jobs if getattr(args, "jobs", None) is None else args.jobs
    return dataclasses.replace(settings, config=cfg, seeds=seeds, rerun=rerun, jobs=jobs)


def _cmd_study(args: argparse.Namespace) -> int:
    from .preflight import dry_run, fetch_tasks  # noqa: PLC0415

    quiet_library_warnings()
    settings = _settings_from_args(args)
    tasks = fetch_tasks(settings.config)  # every data source fetched before any model loads
    if args.dry_run:
        dry_run(settings.config, tasks)
        return 0
    print(f"study directory: {args.run_dir}  (rerun the same command to resume; finished seeds are not redone)")
    result = run_study(settings, args.run_dir, progress=not args.no_progress, worker_setup=_quiet_worker)
    print((Path(args.run_dir) / "study.md").read_text())
    print("plots: " + ", ".join(result["plots"].values()))
    return 0


def _quiet_worker() -> None:
    """What a ``--jobs`` worker process prints: as this command, less the libraries' bars (one bar counts seeds)."""
    quiet_library_warnings()
    no_library_progress_bars()


def _cmd_pilot(args: argparse.Namespace) -> int:
    from ..study.pilot import run_pilot  # noqa: PLC0415
    from .preflight import dry_run, fetch_tasks  # noqa: PLC0415

    quiet_library_warnings()
    settings = _settings_from_args(args)
    tasks = tuple(args.tasks) if args.tasks else PILOT_CANDIDATES
    fetched = fetch_tasks(settings.config, tasks)  # every data source fetched before any model loads
    if args.dry_run:
        dry_run(settings.config, fetched)
        return 0
    result = run_pilot(settings.config, args.run_dir, tasks=tasks, margin=args.margin, progress=not args.no_progress)
    print((Path(args.run_dir) / "pilot.md").read_text())
    return 0 if result["kept"] else 1


def _add_common(parser: argparse.ArgumentParser, *, preset: str, run_dir: str) -> None:
    parser.add_argument("--preset", default=preset, help=f"named study settings: {', '.join(STUDY_PRESETS)}")
    parser.add_argument("--config", help="a JSON file of ExperimentConfig fields (instead of the preset's)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="change one setting (as in sorlora run --help)"
    )
    parser.add_argument("--run-dir", default=run_dir, help="where the runs and the results go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_dry_run_argument(parser)


def add_study_commands(subparsers: Any) -> None:
    """Mount ``sorlora study`` and ``sorlora pilot`` on the ``sorlora`` command line."""
    study = subparsers.add_parser("study", help="run (or resume) the multi-seed study with CIs and contrasts")
    _add_common(study, preset="study", run_dir="runs/study")
    study.add_argument("--seeds", help="comma-separated seeds (default: the preset's, 0,1,2,3,4)")
    study.add_argument(
        "--jobs", type=int, metavar="N",
        help="seeds run at once, each in its own process on 1/N of the cores (default 1; two at a time on 2 cores "
             "finish 1.4x the seeds per hour)",
    )  # fmt: skip
    study.add_argument(
        "--rerun", metavar="METHODS",
        help="comma-separated methods to run again on the finished seeds (seed-<s>/rerun; their rows replace the "
             "seed's, the other methods' are kept): after a change to how a method is trained or scored",
    )  # fmt: skip
    study.set_defaults(func=_cmd_study)
    pilot = subparsers.add_parser("pilot", help="keep the tasks that learn (validation questions only)")
    _add_common(pilot, preset="pilot", run_dir="runs/pilot")
    pilot.add_argument("--tasks", nargs="+", help=f"candidate tasks (default: {', '.join(PILOT_CANDIDATES)})")
    pilot.add_argument("--margin", type=float, default=0.1, help="smallest gain over the base to keep a task")
    pilot.set_defaults(func=_cmd_pilot)
