"""``sorlora attacks``: the attack suite (one hostile member; what the honest members lose, mean vs clipped) and what
the task statistics leak (matching pursuit, :mod:`sorlora.study.leakage`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..study.attacks import ATTACKS, ENGINES, SuiteSettings

__all__ = ["add_attack_commands"]


def _names(text: str, known: tuple[str, ...] | None, what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if known is not None and n not in known]
    if bad or not names:
        raise ValueError(f"--{what}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(known or ())}")
    return names


def _cmd_attacks(args: argparse.Namespace) -> int:
    from sorlora_gossip.robust import STRATEGIES  # noqa: PLC0415

    from ..study.attacks import run_suite  # noqa: PLC0415

    try:
        members = tuple(int(n) for n in args.members.split(","))
    except ValueError:
        raise ValueError(f"--members must be comma-separated integers, got {args.members!r}") from None
    try:
        seeds = tuple(int(n) for n in args.seeds.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if any(n < 3 for n in members):
        raise ValueError("--members: a collaboration needs at least 3 members (2 honest and the hostile one)")
    settings = dataclasses.replace(
        SuiteSettings(),
        members=members,
        attacks=_names(args.attacks, tuple(ATTACKS), "attacks"),
        aggregations=_names(args.aggregations, tuple(STRATEGIES), "aggregations"),
        engines=_names(args.engines, ENGINES, "engines"),
        seeds=seeds,
    )
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.only in (None, "suite"):
        run_suite(settings, out, progress=not args.no_progress, resume=args.resume)
        print((out / "attacks.md").read_text())
        print(f"table: {out / 'attacks.md'}, {out / 'attacks.json'}; plot: {out / 'attacks.png'}")
    if args.only in (None, "privacy"):
        from ..atomic import write_json  # noqa: PLC0415
        from ..study.leakage import privacy_measurement, privacy_table  # noqa: PLC0415

        rows = privacy_measurement()
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "privacy.json", {"rows": rows})
        (out / "privacy.md").write_text(privacy_table(rows))
        print(privacy_table(rows))
    return 0


def add_attack_commands(subparsers: Any) -> None:
    """Mount ``attacks``."""
    p = subparsers.add_parser(
        "attacks", help="the attack suite: one hostile member, each attack with mean and clipped aggregation"
    )
    p.add_argument("--members", default="4,8", help="collaboration sizes, comma-separated (one member hostile)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    p.add_argument("--aggregations", default="mean,clipped", help="comma-separated strategies to compare")
    p.add_argument("--engines", default="local", help=f"comma-separated, of {', '.join(ENGINES)} (one token per "
                   "user over HTTP)")  # fmt: skip
    p.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds (data and terms): every cell runs once per "
        "seed; each share is paired with its seed's no-attack run, then averaged with a 95%% interval",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the cells of an attacks.json already in --out that "
        "ran under the same settings (e.g. mean's when only the robust rule changed); run the others",
    )
    p.add_argument("--out", default="results/attacks", help="where attacks.json, attacks.md and attacks.png go")
    p.add_argument("--only", choices=("suite", "privacy"), help="run only the attack suite or only the privacy "
                   "measurement (matching pursuit on the task statistics: privacy.json, privacy.md)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no line per collaboration")
    p.set_defaults(func=_cmd_attacks)
