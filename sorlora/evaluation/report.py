"""Results of a run as the paper's Table I (markdown) and PNG plots, written into the run directory."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .stats import planned_detectable_difference

__all__ = ["fmt_bytes", "results_table", "write_report"]


def _fmt_int(n: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def results_table(summary: dict[str, Any]) -> str:
    """Markdown table: method x task accuracy (%), average, params updated/transmitted, bytes, collision rate."""
    methods = summary["methods"]
    tasks = list(summary["config"]["tasks"])
    base_params = summary.get("base_params") or 0
    header = ["method", *tasks, "average", "params updated / peer", "params sent / link / round", "bytes sent (total)",
              "collision rate"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, res in methods.items():
        acc = res["accuracy"]
        pct = f" ({100 * res['params_updated'] / base_params:.2f}%)" if base_params else ""
        cr = res.get("collision_rate")
        row = [
            name,
            *[f"{100 * acc[t]:.1f}" for t in tasks],
            f"**{100 * res['average']:.1f}**",
            _fmt_int(res["params_updated"]) + pct,
            _fmt_int(res["params_transmitted_per_round"]),
            fmt_bytes(res["bytes_transmitted"]),
            "—" if cr is None else f"{cr:.3f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    n_test = next(iter(methods.values()))["n_test"] if methods else {}
    n_total = sum(n_test.values())
    noise = 100 * math.sqrt(0.25 / n_total) if n_total else float("nan")
    detectable = 100 * planned_detectable_difference(n_total, 1, seed_sd=0.0) if n_total else float("nan")
    cfg = summary["config"]
    lines.append("")
    lines.append(
        f"Accuracy in % (multiple-choice log-likelihood, mean over peers' models), {n_total} test questions "
        f"({', '.join(f'{t}: {n}' for t, n in n_test.items())}); the average carries about ±{noise:.1f} points of "
        f"sampling noise (1 s.e. at 50%), and one seed can only detect differences between two methods of about "
        f"{detectable:.0f} points (paired, 80% power, if 30% of questions are answered differently; `sorlora study` "
        f"runs several seeds). Base model {summary.get('base_model')}; {cfg['peers']} peers, "
        f"{cfg['rounds']} rounds × {cfg['local_steps']} steps, batch {cfg['batch_size']}, rank {cfg['rank']}, "
        f"sparsity {cfg['sparsity']}, seed {cfg['seed']}."
    )
    lines += [_curve_note(cfg, "accuracy_vs_round.png")]
    oracle = methods.get("oracle")
    if oracle and oracle.get("clusters") and max(len(c) for c in oracle["clusters"]) < 2:
        lines.append(
            f"`oracle` has only one peer per task here ({cfg['peers']} peers, {len(tasks)} tasks): its per-task "
            "clusters never aggregate, so it is `local`'s training scored with routing by the true task — **not an "
            "upper bound**. Give it at least two peers per task (e.g. `--set peers=" + str(2 * len(tasks)) + "`)."
        )
    ari = {name: res for name, res in methods.items() if res.get("cluster_task_ari") is not None}
    if ari:
        lines.append(
            "Clusters against tasks (adjusted Rand index; 1: one cluster per task, about 0: unrelated to the tasks): "
            + ", ".join(f"`{n}` {r['cluster_task_ari']:.2f} ({len(r['clusters'])} clusters)" for n, r in ari.items())
            + "."
        )
    inter = {name: res for name, res in methods.items() if res.get("inter_cluster_bytes")}
    if inter:
        lines.append(
            "Bytes sent count every byte pulled, the inter-cluster exchange included: "
            + ", ".join(
                f"`{n}` {fmt_bytes(r['inter_cluster_bytes'])} of its {fmt_bytes(r['bytes_transmitted'])}"
                for n, r in inter.items()
            )  # fmt: skip
            + "."
        )
    for name, res in methods.items():
        lines += _moe_notes(name, res, tasks)
    skipped = _skipped_questions(methods)
    if skipped:
        lines.append(
            f"Questions not scored because they do not fit max_len={cfg['max_len']} tokens (skipped for every "
            "method, never cut): " + ", ".join(f"{t}: {k} of {n_test[t]}" for t, k in skipped.items()) + "."
        )
    return "\n".join(lines) + "\n"


def _moe_notes(name: str, res: dict[str, Any], tasks: list[str]) -> list[str]:
    """What a run measured of an implicit MoE: the router settings chosen, the same weights summed or routed by the
    true task, and how much of what the router keeps goes to each task's own expert."""
    lines = []
    router = res.get("router")
    if router:
        lines.append(f"`{name}`'s router settings, chosen on validation questions: `{router['chosen']}`.")
    variants = res.get("variants") or {}
    if variants:
        lines.append(
            f"`{name}`'s own weights scored otherwise (average %): "
            + ", ".join(
                f"{v}: {100 * sum(r['accuracy'].values()) / len(r['accuracy']):.1f}" for v, r in variants.items()
            )
            + f" (the router: {100 * res['average']:.1f}; sum = every component of every cluster kept, "
            "hard = each task served by its own cluster's expert alone)."
        )
    published = res.get("published_router")
    if published:
        lines.append(f"`{name}`'s row is its published MoE under the `{published}` router.")
    diagnostics = res.get("routing_diagnostics") or {}
    if diagnostics:
        lines += ["", f"`{name}`'s routing on the test prompts (cluster-selection accuracy per task against the cluster "
                  "holding the task; own-expert share of the kept components):", "",
                  "| router | " + " | ".join(f"{t} acc / own" for t in tasks) + " | min acc |",
                  "|---|" + "---|" * (len(tasks) + 1)]  # fmt: skip
        for router_name, d in diagnostics.items():
            if "unavailable" in d:
                lines.append(f"| {router_name} | " + " | ".join("–" for _ in tasks) + " | unavailable |")
                continue
            cells = [f"{100 * d['accuracy'][t]:.0f}% / {d['own_share'][t]:.2f}" if t in d["accuracy"] else "–"
                     for t in tasks]  # fmt: skip
            lines.append(f"| {router_name} | " + " | ".join(cells) + f" | {100 * d['min_accuracy']:.0f}% |")
        lines.append("")
    routing = res.get("routing")
    if routing:
        lines.append(
            f"Share of the components `{name}`'s router keeps that belong to the task's own expert (test prompts): "
            + ", ".join(f"{t} {routing[t]['own_share']:.2f}" for t in tasks if t in routing)
            + f" (uniform {next(iter(routing.values()))['uniform']:.2f} would mean no separation of the tasks)."
        )
    return lines


def _curve_note(cfg: dict[str, Any], plot: str) -> str:
    """What the accuracy-vs-round curve shows (it is not the final model)."""
    return (
        f"`{plot}` (and `curve` in results.json): after each round, the mean over every member of its own model at "
        "that round (its adapter plus the cluster's or neighbours' parts its forward holds), on the first "
        f"{cfg.get('n_curve')} test questions per task that fit max_len, dealt round-robin to the members — a noisy "
        "subset, and not the final model: no inter-cluster exchange, no implicit-MoE router, no hard routing by task, "
        "so its last point can differ from the table."
    )


def _skipped_questions(methods: dict[str, Any]) -> dict[str, int]:
    """Per task, how many test questions a run skipped for truncation (None in its per-question outcomes)."""
    for res in methods.values():
        per_question = res.get("per_question")
        if per_question:
            counts = {t: sum(c is None for c in q["correct"]) for t, q in per_question.items()}
            return {t: k for t, k in counts.items() if k}
    return {}


def _plot(path: Path, title: str, ylabel: str, series: dict[str, list[float]], *, cumulative: bool = False) -> None:
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, values in series.items():
        ys = list(values)
        if cumulative:
            ys = [sum(ys[: i + 1]) for i in range(len(ys))]
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_report(summary: dict[str, Any], run_dir: str | Path) -> dict[str, Path]:
    """Write results.md, accuracy_vs_round.png, bytes_vs_round.png and topology.png; return their paths."""
    run_dir = Path(run_dir)
    paths = {"table": run_dir / "results.md"}
    paths["table"].write_text("# Results\n\n" + results_table(summary))
    methods = summary["methods"]
    curves = {m: [sum(c.values()) / len(c) for c in r["curve"]] for m, r in methods.items()}
    paths["accuracy"] = run_dir / "accuracy_vs_round.png"
    n_curve = summary["config"].get("n_curve")
    _plot(paths["accuracy"], f"Accuracy vs round: mean over members' own views ({n_curve} questions per task)",
          "accuracy (not the final model)", curves)  # fmt: skip
    paths["bytes"] = run_dir / "bytes_vs_round.png"
    _plot(paths["bytes"], "Cumulative bytes sent (all links)", "bytes", {m: r["bytes_by_round"] for m, r in methods.items()},
          cumulative=True)  # fmt: skip
    for method in ("solora", *methods):
        source = run_dir / "methods" / method / "topology.png"
        if source.exists():
            paths["topology"] = run_dir / "topology.png"
            shutil.copyfile(source, paths["topology"])
            break
    return paths
