"""The ``sorlora`` command line: run the experiment, and inspect or drive gossip peers on a hub."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config_from_args(args: argparse.Namespace):
    from .config import ExperimentConfig, preset

    cfg = ExperimentConfig.from_file(args.config) if args.config else preset(args.preset)
    changes = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        value = _parse_value(value)
        changes[key] = tuple(value) if isinstance(value, list) else value
    if args.engine:
        changes["engine"] = args.engine
    if args.hub:
        changes["hub"] = args.hub
    known = set(cfg.to_dict())
    unknown = set(changes) - known
    if unknown:
        raise SystemExit(f"unknown setting(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    return cfg.replace(**changes)


def _quiet_library_warnings() -> None:
    """Hide warnings the run triggers by design (adapters share one base model; GGUF weights are dequantized)."""
    for pattern in (
        ".*base_model_name_or_path.*was renamed.*",
        ".*is_gradient_checkpointing.*",
        ".*Could not find a config file.*",
        ".*Already unmerged.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_experiment

    _quiet_library_warnings()

    cfg = _config_from_args(args)
    run_dir = Path(args.run_dir)
    print(f"run directory: {run_dir}  (rerun the same command to resume)")
    summary = run_experiment(cfg, run_dir, progress=not args.no_progress)
    print((run_dir / "results.md").read_text())
    print(f"plots: {run_dir / 'accuracy_vs_round.png'}, {run_dir / 'bytes_vs_round.png'}, {run_dir / 'topology.png'}")
    return 0 if summary["methods"] else 1


def _cmd_tune_lr(args: argparse.Namespace) -> int:
    from .tuning import tune_learning_rates

    _quiet_library_warnings()
    cfg = _config_from_args(args)
    grid = [float(x) for x in args.grid.split(",")]
    result = tune_learning_rates(cfg, args.run_dir, grid=grid, methods=args.methods, progress=not args.no_progress)
    print("validation accuracy (mean over tasks) per method and learning rate:")
    for method, scores in result["scores"].items():
        cells = "  ".join(f"lr={lr}: {100 * acc:.1f}" for lr, acc in scores.items())
        print(f"  {method:14s} {cells}   -> best {result['best'][method]:g}")
    print("use them with:  --set lr='" + json.dumps({**cfg.lr, **result["best"]}) + "'")
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser, default_dir: str) -> None:
    parser.add_argument("--preset", default="demo", help="named settings: demo (default) or smoke")
    parser.add_argument("--config", help="a JSON file of ExperimentConfig fields (instead of --preset)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (JSON value)")
    parser.add_argument("--run-dir", default=default_dir, help="where checkpoints, hub and results go")
    parser.add_argument(
        "--engine",
        choices=["local", "processes", "ray"],
        help="run peers in-process around one base (local), as `sorlora peer` OS processes, or as Ray actors",
    )
    parser.add_argument("--hub", help="a Hub endpoint URL instead of the embedded LocalHub")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sorlora`` (subcommands: run, and the gossip commands)."""
    parser = argparse.ArgumentParser(prog="sorlora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the decentralized multi-task experiment")
    _add_config_arguments(run, "runs/demo")
    run.set_defaults(func=_cmd_run)
    tune = sub.add_parser("tune-lr", help="choose each method's learning rate on a validation split")
    _add_config_arguments(tune, "runs/tune-lr")
    tune.add_argument("--grid", default="1e-3,3e-3,1e-2", help="comma-separated learning rates to try")
    tune.add_argument("--methods", nargs="+", help="methods to tune (default: the config's)")
    tune.set_defaults(func=_cmd_tune_lr)
    from sorlora_gossip.cli import add_gossip_commands

    add_gossip_commands(sub)
    from .study import add_study_commands  # sorlora study, sorlora pilot

    add_study_commands(sub)
    from .cli_collab import add_collab_commands

    add_collab_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sorlora`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
