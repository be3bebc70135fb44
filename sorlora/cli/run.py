"""``sorlora run``, ``sorlora tune-lr`` and ``sorlora tasks``: the experiment, its learning rates and the task registry.

Settings are checked (``--set``, the run directory, the model, every task's data, a remote hub) before any model
is loaded; ``--dry-run`` then loads the model and stops (:mod:`.preflight`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..simulation.engines import ENGINES
from .errors import UsageError
from .preflight import add_dry_run_argument
from .quiet import quiet_library_warnings

__all__ = ["add_run_commands"]


def _config_from_args(args: argparse.Namespace):
    """The run's settings: ``--preset`` or ``--config``, then every ``--set``, ``--engine`` and ``--hub`` (checked)."""
    from ..simulation.config import ExperimentConfig, apply_settings, preset

    cfg = ExperimentConfig.from_file(args.config) if args.config else preset(args.preset)
    items = list(args.set or [])
    if args.engine:
        items.append(f"engine={args.engine}")
    if args.hub:
        items.append(f"hub={args.hub}")
    return apply_settings(cfg, items)


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run directory {str(run_dir)!r} is a file, not a folder: choose another --run-dir")


def _check_model(model: str | None) -> None:
    """A ``model`` setting must be a model folder or a Hub id (``org/name``); a mistyped path fails here, not later."""
    if model in (None, "tiny-random"):
        return
    path = Path(model).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"model {model!r} is a file: give a model folder, a Hub id (org/name) or none")
    if not path.exists() and (model.startswith(("/", ".", "~")) or model.count("/") != 1):
        raise UsageError(f"model {model!r} is neither an existing model folder nor a Hub id (org/name)")


def _preflight(cfg, run_dir: Path):
    """Everything that can be checked without the model: run dir, stored settings, tasks and data, hub access.

    Returns the loaded tasks (handed to the runner, so they are read once).
    """
    from ..simulation.setup import check_run_dir_settings, load_tasks, open_run_hub, task_shards

    _check_run_dir(run_dir)
    check_run_dir_settings(cfg, run_dir)
    _check_model(cfg.model)
    tasks = load_tasks(cfg)
    task_shards(cfg, tasks)
    if cfg.hub:  # a remote hub: reachable, and the token accepted, before minutes of model loading
        _probe_hub(open_run_hub(cfg, run_dir)[0])
    return tasks


def _probe_hub(hub) -> None:
    """One cheap request to ``hub``: raises HubUnavailable (down) or HubAuthError (token refused), else returns.

    Asks for a repo that need not exist (``model_info``, retried only by HfHub's own policy; ``list_models`` would
    add huggingface_hub's retries on top).
    """
    from sorlora_gossip.hub import EntryNotFound, RepoNotFound, RevisionNotFound

    try:
        hub.resolve(hub.repo_id("sorlora-reachability-probe"))
    except (RepoNotFound, RevisionNotFound, EntryNotFound):
        pass


# ---------------------------------------------------------------- commands


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    run_dir = Path(args.run_dir)
    tasks = _preflight(cfg, run_dir)
    if args.dry_run:
        from .preflight import dry_run  # noqa: PLC0415

        dry_run(cfg, tasks)
        return 0
    from ..simulation.runner import run_experiment

    quiet_library_warnings()
    print(f"run directory: {run_dir}  (rerun the same command to resume)")
    summary = run_experiment(cfg, run_dir, progress=not args.no_progress, tasks=tasks)
    print((run_dir / "results.md").read_text())
    print(f"plots: {run_dir / 'accuracy_vs_round.png'}, {run_dir / 'bytes_vs_round.png'}, {run_dir / 'topology.png'}")
    return 0 if summary["methods"] else 1


def _learning_rates(text: str) -> list[float]:
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,3e-3, got {text!r}") from None
    if not grid or any(lr <= 0 for lr in grid):
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return grid


def _cmd_tune_lr(args: argparse.Namespace) -> int:
    from ..methods.specs import method_names

    cfg = _config_from_args(args)
    unknown = [m for m in args.methods or () if m not in method_names()]
    if unknown:
        raise UsageError(f"unknown methods {unknown} in --methods; choose from {', '.join(method_names())}")
    if cfg.n_validation <= 0:
        raise UsageError("tuning needs validation questions: --set n_validation=24 (or any number > 0)")
    _check_run_dir(Path(args.run_dir))
    _check_model(cfg.model)
    from ..simulation.setup import load_tasks, task_shards

    tasks = load_tasks(cfg)
    task_shards(cfg, tasks)
    if args.dry_run:
        from .preflight import dry_run  # noqa: PLC0415

        dry_run(cfg, tasks)
        return 0
    from ..study.tuning import tune_learning_rates

    quiet_library_warnings()
    result = tune_learning_rates(cfg, args.run_dir, grid=args.grid, methods=args.methods, progress=not args.no_progress)
    print("validation accuracy (mean over tasks) per method and learning rate:")
    for method, scores in result["scores"].items():
        cells = "  ".join(f"lr={lr}: {100 * acc:.1f}" for lr, acc in scores.items())
        print(f"  {method:14s} {cells}   -> best {result['best'][method]:g}")
    print("use them with:  --set lr='" + json.dumps({**cfg.lr, **result["best"]}) + "'")
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser, default_dir: str) -> None:
    from ..simulation.config import PRESETS

    presets = ", ".join(sorted(PRESETS))
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help=f"named settings ({presets}; default: demo)")  # fmt: skip
    parser.add_argument("--config", metavar="FILE", help="a JSON file of settings (instead of --preset)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="change one setting (repeat; the settings are listed below)")  # fmt: skip
    parser.add_argument("--run-dir", default=default_dir,
                        help=f"folder for checkpoints, the LocalHub and results (default: {default_dir})")  # fmt: skip
    parser.add_argument("--engine", choices=list(ENGINES),
                        help="run peers in-process around one base (local), as `sorlora peer` OS processes, or as "
                        "Ray actors; same as --set engine=...")  # fmt: skip
    parser.add_argument("--hub", metavar="URL",
                        help="an http(s):// Hub endpoint instead of the LocalHub in the run dir (token: $HF_TOKEN)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_dry_run_argument(parser)


def _cmd_tasks(args: argparse.Namespace) -> int:
    """``sorlora tasks``: the registry with each task's source, kind, size, cache state and the pilot's verdict."""
    from ..data.registry import TASKS
    from ..data.sources import SOURCES, cached_archive

    verdicts = _pilot_verdicts(Path(args.pilot)) if args.pilot else {}
    rows = []
    for name, spec in TASKS.items():
        source = SOURCES.get(spec.source)
        if source is None:
            where, cached, size = spec.source, "needs Hub access", "-"
        else:
            where = source.requirement
            archive = cached_archive(source)
            cached = "cached" if archive is not None else "not cached"
            size = str(len(spec.loader()["all"])) if archive is not None else "-"  # read only what is cached
        rows.append((name, spec.kind, where, size, cached, verdicts.get(name, "-")))
    widths = [max(len(r[i]) for r in [*rows, _TASK_HEADER]) for i in range(len(_TASK_HEADER))]
    for row in [_TASK_HEADER, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("sources and licences: README.md, 'Where the data comes from'; pinned in sorlora/data/sources.py")
    return 0


_TASK_HEADER = ("task", "kind", "source", "examples", "cache", "pilot")


def _pilot_verdicts(path: Path) -> dict[str, str]:
    """task -> 'kept (+36.8)' / 'dropped (+1.7)' from a pilot's ``pilot.json`` (a file or its run directory)."""
    path = path / "pilot.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"no pilot results at {str(path)!r}: run `sorlora pilot` first or give its --run-dir")
    result = json.loads(path.read_text())
    verdicts = {}
    for name, row in result.get("tasks", {}).items():
        gain = row.get("gain")
        shown = f" ({100 * gain:+.1f})" if isinstance(gain, (int, float)) else ""
        verdicts[name] = ("kept" if row.get("kept") else "dropped") + shown
    return verdicts


def _settings_epilog() -> str:
    from ..simulation.config import settings_help

    return (
        "settings (--set KEY=VALUE; lists as a,b or a JSON list; none for no value; lr=0.01 sets every method's "
        "learning rate, lr='{\"solora\": 0.01}' one method's):\n" + settings_help()
    )


def _default_pilot() -> str | None:
    path = Path("results/pilot/pilot.json")
    return str(path) if path.is_file() else None


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    """Mount ``run``, ``tune-lr`` and ``tasks``."""
    epilog = _settings_epilog()
    run = sub.add_parser(
        "run",
        help="run (or resume) the decentralized multi-task experiment",
        description="Run (or resume: rerun the same command) the experiment in --run-dir and print its results.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(run, "runs/demo")
    run.set_defaults(func=_cmd_run)
    tune = sub.add_parser(
        "tune-lr",
        help="choose each method's learning rate on a validation split",
        description="Run every method at every learning rate of --grid; score on validation questions, never test.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(tune, "runs/tune-lr")
    tune.add_argument("--grid", default=[1e-3, 3e-3, 1e-2], type=_learning_rates, metavar="LR,LR,...",
                      help="comma-separated learning rates to try (default: 1e-3,3e-3,1e-2)")  # fmt: skip
    tune.add_argument("--methods", nargs="+", metavar="METHOD", help="methods to tune (default: the config's)")
    tune.set_defaults(func=_cmd_tune_lr)
    tasks = sub.add_parser("tasks", help="list the registered tasks: source, size, cache, the pilot's verdict",
                           description="List the task registry: each task's kind, pinned source, number of examples "
                           "(of cached sources: nothing is downloaded), cache state and the pilot's verdict.")  # fmt: skip
    tasks.add_argument("--pilot", metavar="PATH", default=_default_pilot(),
                       help="a pilot's pilot.json or run directory for the verdict column (default: the README's "
                       "results/pilot when run from the repository)")  # fmt: skip
    tasks.set_defaults(func=_cmd_tasks)
