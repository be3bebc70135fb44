"""The ``sorlora`` command line: run the experiment, tune learning rates, and inspect or drive gossip peers on a hub.

Every user error (a bad option or ``--set`` value, a missing file, a run directory that is a file, a hub that is
down or refuses the token, a busy port) is answered with one line that says what to do, and exit code 2; settings
are checked before any model is loaded. ``-v`` adds the traceback to that line, for bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import USAGE_ERROR, UsageError, explain

__all__ = ["main", "build_parser", "UsageError"]

logger = logging.getLogger("sorlora")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (what is wrong, where to look) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sorlora``: every command group mounts its commands."""
    from sorlora_gossip.cli import add_gossip_commands  # noqa: PLC0415

    from .attacks import add_attack_commands  # noqa: PLC0415
    from .collab import add_collab_commands  # noqa: PLC0415
    from .eval import add_eval_commands  # noqa: PLC0415
    from .run import add_run_commands  # noqa: PLC0415
    from .study import add_study_commands  # noqa: PLC0415

    parser = _Parser(prog="sorlora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; errors with tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_commands(sub)  # run, tune-lr, tasks
    add_gossip_commands(sub)  # status, push, pull, hub-serve
    add_study_commands(sub)  # study, pilot
    add_attack_commands(sub)  # attacks
    add_collab_commands(sub)  # collab create|status|terms, peer
    add_eval_commands(sub)  # eval
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sorlora`` console script; returns the exit code (2 for every user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from .quiet import no_library_progress_bars, no_public_lookups, quiet_hub_retries  # noqa: PLC0415

    if getattr(args, "no_progress", False):
        no_library_progress_bars()
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        with (
            contextlib.nullcontext() if args.verbose else quiet_hub_retries(),
            no_public_lookups(getattr(args, "hub", None)),
        ):
            return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        line = explain(exc, args)
        if line is None:
            raise
        if args.verbose:
            logger.exception("user error")
        print(f"sorlora {args.command}: error: {line}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
