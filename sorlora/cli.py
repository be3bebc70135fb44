"""The ``sorlora`` command line: run the experiment, tune learning rates, and inspect or drive gossip peers on a hub.

Every user error (a bad option or ``--set`` value, a missing file, a run directory that is a file, a hub that is
down or refuses the token, a busy port) is answered with one line that says what to do, and exit code 2; settings
are checked before any model is loaded. ``-v`` adds the traceback to that line, for bug reports.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "UsageError"]

logger = logging.getLogger("sorlora")

USAGE_ERROR = 2  # exit code of every user error (as argparse uses for bad options)


class UsageError(Exception):
    """A user error found by the CLI itself: printed as one ``error: ...`` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (what is wrong, where to look) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- settings and pre-flight checks


def _config_from_args(args: argparse.Namespace):
    """The run's settings: ``--preset`` or ``--config``, then every ``--set``, ``--engine`` and ``--hub`` (checked)."""
    from .config import ExperimentConfig, apply_settings, preset

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
    from .runner import check_run_dir_settings, load_tasks, open_run_hub, task_shards

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


def _quiet_library_warnings() -> None:
    """Hide warnings the run triggers by design (adapters share one base model; GGUF weights are dequantized)."""
    for pattern in (
        ".*base_model_name_or_path.*was renamed.*",
        ".*is_gradient_checkpointing.*",
        ".*Could not find a config file.*",
        ".*Already unmerged.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


# ---------------------------------------------------------------- commands


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    run_dir = Path(args.run_dir)
    tasks = _preflight(cfg, run_dir)
    if args.dry_run:
        from .preflight import dry_run

        dry_run(cfg, tasks)
        return 0
    from .runner import run_experiment

    _quiet_library_warnings()
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
    from .config import ALL_METHODS

    cfg = _config_from_args(args)
    unknown = [m for m in args.methods or () if m not in ALL_METHODS]
    if unknown:
        raise UsageError(f"unknown methods {unknown} in --methods; choose from {', '.join(ALL_METHODS)}")
    if cfg.n_validation <= 0:
        raise UsageError("tuning needs validation questions: --set n_validation=24 (or any number > 0)")
    _check_run_dir(Path(args.run_dir))
    _check_model(cfg.model)
    from .runner import load_tasks, task_shards

    tasks = load_tasks(cfg)
    task_shards(cfg, tasks)
    if args.dry_run:
        from .preflight import dry_run

        dry_run(cfg, tasks)
        return 0
    from .tuning import tune_learning_rates

    _quiet_library_warnings()
    result = tune_learning_rates(cfg, args.run_dir, grid=args.grid, methods=args.methods, progress=not args.no_progress)
    print("validation accuracy (mean over tasks) per method and learning rate:")
    for method, scores in result["scores"].items():
        cells = "  ".join(f"lr={lr}: {100 * acc:.1f}" for lr, acc in scores.items())
        print(f"  {method:14s} {cells}   -> best {result['best'][method]:g}")
    print("use them with:  --set lr='" + json.dumps({**cfg.lr, **result["best"]}) + "'")
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser, default_dir: str) -> None:
    from .config import PRESETS
    from .preflight import add_dry_run_argument

    presets = ", ".join(sorted(PRESETS))
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                        help=f"named settings ({presets}; default: demo)")  # fmt: skip
    parser.add_argument("--config", metavar="FILE", help="a JSON file of settings (instead of --preset)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="change one setting (repeat; the settings are listed below)")  # fmt: skip
    parser.add_argument("--run-dir", default=default_dir,
                        help=f"folder for checkpoints, the LocalHub and results (default: {default_dir})")  # fmt: skip
    parser.add_argument("--engine", choices=["local", "processes", "ray"],
                        help="run peers in-process around one base (local), as `sorlora peer` OS processes, or as "
                        "Ray actors; same as --set engine=...")  # fmt: skip
    parser.add_argument("--hub", metavar="URL",
                        help="an http(s):// Hub endpoint instead of the LocalHub in the run dir (token: $HF_TOKEN)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_dry_run_argument(parser)


def _cmd_tasks(args: argparse.Namespace) -> int:
    """``sorlora tasks``: the registry with each task's source, kind, size, cache state and the pilot's verdict."""
    from .data_sources import SOURCES, cached_archive
    from .tasks import TASKS

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
    print("sources and licences: README.md, 'Where the data comes from'; pinned in sorlora/data_sources.py")
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
    from .config import settings_help

    return (
        "settings (--set KEY=VALUE; lists as a,b or a JSON list; none for no value; lr=0.01 sets every method's "
        "learning rate, lr='{\"solora\": 0.01}' one method's):\n" + settings_help()
    )


def _default_pilot() -> str | None:
    path = Path("results/pilot/pilot.json")
    return str(path) if path.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sorlora`` (subcommands: run, tune-lr, and the gossip commands)."""
    parser = _Parser(prog="sorlora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; errors with tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    from sorlora_gossip.cli import add_gossip_commands

    add_gossip_commands(sub)
    from .study import add_study_commands  # sorlora study, sorlora pilot

    add_study_commands(sub)
    from .cli_collab import add_collab_commands

    add_collab_commands(sub)
    return parser


# ---------------------------------------------------------------- errors: one line each


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _explain(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for a user error, or None for anything else (a bug: its traceback is shown)."""
    from sorlora_gossip.hub import HubAuthError, HubError, HubUnavailable

    from .data_sources import DataSourceError

    if isinstance(exc, DataSourceError):  # the whole line: it ends with what to do
        return " ".join(str(exc).split())
    token_env = getattr(args, "token_env", "HF_TOKEN")
    if isinstance(exc, HubAuthError):
        return f"the hub refused the credentials ({_one_line(exc)}): check the token in ${token_env}"
    if isinstance(exc, HubUnavailable):
        return f"the hub is unreachable ({_one_line(exc)}): check the endpoint URL and that the hub is up"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        where = f"{getattr(args, 'host', '')}:{getattr(args, 'port', '')}"
        return f"address {where} is already in use: choose another --port or stop the program serving it"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, PermissionError)) and exc.filename and exc.strerror:
        return f"{exc.filename!r}: {exc.strerror.lower()} (check the path)"
    if isinstance(exc, (UsageError, HubError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)):
        return _one_line(exc)
    if isinstance(exc, (IsADirectoryError, FileExistsError)):
        return _one_line(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sorlora`` console script; returns the exit code (2 for every user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        line = _explain(exc, args)
        if line is None:
            raise
        if args.verbose:
            logger.exception("user error")
        print(f"sorlora {args.command}: error: {line}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
