"""``python -m benchmarks``: run the benchmark entries, write ``benchmarks/results/<date>.json`` and ``<date>.md``,
print the table. Every figure is reported with its anchor measured in the same run, as a ratio.

Entries are modules of this package named in :data:`ENTRIES`, each with ``run(repeats=5[, quick=False]) ->
list[dict]``; an entry in :data:`OPTIONAL` whose module is not there (e.g. ``ray_scale`` without Ray) is skipped.
"""

from __future__ import annotations

import os

# Read by huggingface_hub at import: the gossip entry talks to a local HubServer only (no Xet, no telemetry).
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from .common import SEED, machine_info, seed_everything  # noqa: E402

__all__ = ["ENTRIES", "OPTIONAL", "main", "run_entry", "normalize_row", "markdown_table"]

ENTRIES = ["train_step", "wire_bytes", "moe_latency", "gossip_round", "scale", "ray_scale", "hub_memory", "peer_memory"]
OPTIONAL = {"ray_scale"}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def normalize_row(entry: str, row: dict) -> dict:
    """A row in the common shape (see :func:`benchmarks.common.rows_against`); also accepts the older
    ``{name, median_s, min_s, max_s, ratio_to_anchor, anchor}`` shape."""
    if "median" not in row and "median_s" not in row:
        raise ValueError(f"entry {entry!r} returned a row without a median: {row}")
    out = dict(row)
    if "median" not in out:
        out.update(median=row["median_s"], min=row["min_s"], max=row["max_s"], unit=row.get("unit", "s"))
    out.setdefault("ratio", row.get("ratio_to_anchor"))
    out.setdefault("entry", entry)
    out.setdefault("group", entry)
    out.setdefault("anchor_label", out.get("anchor"))
    out.setdefault("note", "")
    out.setdefault("is_anchor", out["name"] == out.get("anchor"))
    out.setdefault("params", {})
    ratio = out["ratio"]
    out.setdefault("worse", ratio is not None and out["name"] != out.get("anchor") and ratio > 1.0)
    return out


def run_entry(name: str, *, repeats: int, quick: bool) -> dict:
    """Import and run one entry; returns ``{entry, status, seconds, rows|error}`` (status ok/skipped/error)."""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if name in OPTIONAL and exc.name in (f"benchmarks.{name}", "ray"):
            return {"entry": name, "status": "skipped", "seconds": 0.0, "error": f"not available: {exc}"}
        raise
    kwargs: dict[str, object] = {"repeats": repeats}
    if "quick" in inspect.signature(module.run).parameters:
        kwargs["quick"] = quick
    seed_everything(SEED)
    start = time.perf_counter()
    try:
        rows = [normalize_row(name, r) for r in module.run(**kwargs)]
    except Exception as exc:  # noqa: BLE001 - one failing entry must not hide the others' results
        traceback.print_exc()
        return {"entry": name, "status": "error", "seconds": time.perf_counter() - start, "error": repr(exc)}
    return {"entry": name, "status": "ok", "seconds": time.perf_counter() - start, "rows": rows}


def _fmt_value(value: float, unit: str) -> str:
    if unit.startswith("bytes"):
        for scale, suffix in ((2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {suffix}{unit[5:]}"
        return f"{value:.0f} B{unit[5:]}"
    if unit.startswith("s"):
        rest = unit[1:]
        if abs(value) < 1e-3:
            return f"{value * 1e6:.1f} µs{rest}"
        if abs(value) < 1:
            return f"{value * 1e3:.2f} ms{rest}"
        return f"{value:.3f} s{rest}"
    return f"{value:,.1f} {unit}"


def _fmt_ratio(row: dict) -> str:
    if row.get("is_anchor"):
        return "anchor"
    ratio = row["ratio"]
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "n/a"
    shown = f"{ratio:.2g}" if ratio < 0.1 else f"{ratio:.2f}"
    text = f"{shown}× {row.get('anchor_label') or row.get('anchor')}"
    text = f"**{text} (worse)**" if row.get("worse") else text
    best = row.get("ratio_of_min")
    if len(row.get("samples") or ()) > 1 and best is not None and not math.isnan(best):
        text += f" (best runs: {best:.2f}×)"
    return text


def markdown_table(results: list[dict], info: dict) -> str:
    """The report: how it was measured, then one table per entry (ratios to the anchor, worse ones in bold)."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    lines = [
        f"# Benchmarks {info['date']}",
        "",
        f"Command: `{info['command']}` (seed {info['seed']}, {info['repeats']} repeats after warm-up; median, "
        "min–max). Ratios are value / anchor median, measured in the same run; lower is better everywhere, and "
        "ratios above 1 are marked **worse** with a note; 'best runs' compares the minimums, the runs least disturbed "
        "by other load on the machine.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), {info['ram_gib']} "
        f"GiB RAM, load average at start {info['load_average_at_start']}; {info['os']}; Python {info['python']}; "
        f"{versions}; commit {info['git_commit']}.",
        "",
    ]
    for result in results:
        lines.append(f"## {result['entry']} ({result['status']}, {result['seconds']:.0f} s)")
        lines.append("")
        if result["status"] != "ok":
            lines += [f"Not measured: {result['error']}", ""]
            continue
        lines += ["| Case | Median | Min – max | vs anchor | Note |", "|---|---|---|---|---|"]
        for row in result["rows"]:
            unit = row.get("unit", "")
            spread = (
                "—" if row["min"] == row["max"] else f"{_fmt_value(row['min'], unit)} – {_fmt_value(row['max'], unit)}"
            )
            note = str(row.get("note") or "").replace("|", "/")
            lines.append(
                f"| {row['name']} | {_fmt_value(row['median'], unit)} | {spread} | {_fmt_ratio(row)} | {note} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the entries, write JSON + markdown, print the table; 1 if an entry failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=ENTRIES, metavar="NAME",
                        help=f"run only this entry (repeatable): {', '.join(ENTRIES)}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="measured runs after warm-up (default 5)")
    parser.add_argument("--quick", action="store_true", help="fast smoke version: tiny models, fewer peers")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where <date>.json/.md go")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    full_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    info = machine_info(seed=SEED, argv=full_argv)
    info.update(repeats=args.repeats, quick=args.quick)
    results = []
    for name in args.only or ENTRIES:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        result = run_entry(name, repeats=args.repeats, quick=args.quick)
        print(f"[bench] {name}: {result['status']} in {result['seconds']:.1f} s", file=sys.stderr, flush=True)
        results.append(result)
    table = markdown_table(results, info)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = info["date"] + ("-quick" if args.quick else "")
    (args.output_dir / f"{stem}.json").write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    (args.output_dir / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {args.output_dir / (stem + '.json')} and {stem}.md", file=sys.stderr)
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
