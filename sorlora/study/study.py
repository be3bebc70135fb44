"""A study that can rank the methods: the same comparison over several seeds, paired per question, with CIs.

Every seed is an ordinary, resumable ``sorlora run`` of the study's settings with ``seed`` changed — the seed also
resamples the data split, the adapters' initialisation and the training order. Besides every method's row, each
seed holds the rows of the evaluation variants a run reports on the same weights (``solora:sum``: the ``solora``
experts with every component kept, the plain sum of all clusters' updates instead of the implicit-MoE router;
``solora:hard``: each task served by the cluster of the peers that hold it) and ``zero-shot`` (the base model
alone), all scored on the same questions. The per-question outcomes of every method are stored per seed (``seed-<s>/seed_result.json``), so a
finished seed is never redone and more seeds can be added later. The statistics (:mod:`sorlora.evaluation.stats`): a
hierarchical bootstrap over seeds and questions, 95% intervals, Holm-corrected pre-registered contrasts and the
smallest difference each contrast could detect with 80% power.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json
from ..evaluation.report import fmt_bytes
from ..evaluation.stats import DIAGNOSTIC_CONTRASTS, PREREGISTERED_CONTRASTS, compare_methods, estimate
from ..simulation.config import ExperimentConfig

__all__ = [
    "STUDY_PRESETS",
    "TARGET_DETECTABLE",
    "StudySettings",
    "run_study",
    "seeds_for_target",
    "study_table",
    "summarize",
]

ZERO_SHOT = "zero-shot"
SEED_RECORD = "seed_result.json"  # a finished seed's record, in its folder (see _seed_dir)
TARGET_DETECTABLE = 0.05  # the study's design target: each pre-registered contrast detects 5 points (80% power)


@dataclass(frozen=True)
class StudySettings:
    """A study: the run settings every seed shares, and the seeds."""

    config: ExperimentConfig
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    zero_shot: bool = field(default=True, metadata={"help": "add the base model alone as a row"})
    n_boot: int = field(default=4000, metadata={"help": "bootstrap replicates per estimate"})
    jobs: int = field(
        default=1,
        metadata={"help": "seeds run at once, each in its own process on an equal share of the cores (not part "
                  "of the fingerprint: a seed's result does not depend on it); on the 2-core development machine "
                  "two at a time finish 1.4x the seeds per hour of one at a time"},
    )  # fmt: skip
    rerun: tuple[str, ...] = field(
        default=(),
        metadata={"help": "methods run again on every finished seed (in seed-<s>/rerun, resumable; delete it to "
                  "rerun once more), whose rows and diagnostics replace the seed's, e.g. after a change to how "
                  "that method is scored; the other methods' rows are kept (not part of the fingerprint)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")

    def fingerprint(self) -> str:
        """The settings that every seed shares (the config without its seed)."""
        return self.config.replace(seed=0).fingerprint()


_STUDY_CONFIG = ExperimentConfig(
    # tasks: the default, the pilot's four strongest (README "Tasks that carry signal")
    # the methods of the pre-registered contrasts; `solora` is scored under every router on the same experts (its
    # variants: implicit, spectral, arrow, sum, hard). The diagnostics oracle, solora-union and solora-cotrain are
    # one --set methods=... away (one more collaboration each per seed); they answer no pre-registered contrast
    methods=("lora", "lori", "solora-single", "solora"),
    # two peers per task (the paper: several devices may share a task): the clusters have tasks to follow (their
    # adjusted Rand index against the tasks is reported); every method gets the same 8 peers and data shards
    peers=8,
    rounds=8,  # 8 rounds beat 4 by 7-12 points for every method (results/study-rounds8); the pilot uses them too
    local_steps=4,
    n_train=256,
    n_test=120,  # 480 questions per seed
    n_validation=24,
    n_curve=8,
    # each question answered by one member of a per-peer method (lora, lori): 1/4 of the scoring cost
    score_members="dealt",
    precision="bfloat16",  # as the demo: mixed precision, about 1.5-2x faster on CPUs with bfloat16 units
)

STUDY_PRESETS: dict[str, StudySettings] = {
    # seeds x 4 tasks x 120 questions; README "Results" gives the cost per seed and the detectable difference
    "study": StudySettings(_STUDY_CONFIG),
    # the pilot's settings: every candidate task, validation questions only (sorlora pilot)
    "pilot": StudySettings(_STUDY_CONFIG.replace(n_validation=60, n_test=60, methods=("local",)), seeds=(0,)),
}


# ---------------------------------------------------------------- one seed


def _row(accuracy: Mapping[str, float], per_question: Mapping[str, Mapping[str, list]], tasks: Sequence[str],
         bytes_sent: int | None) -> dict[str, Any]:  # fmt: skip
    def mean(values: list) -> float:
        scored = [v for v in values if v is not None]
        return float(np.mean(scored)) if scored else float("nan")

    return {
        "accuracy": {t: accuracy[t] for t in tasks},
        "acc_norm": {t: mean(per_question[t]["correct_norm"]) for t in tasks},
        "correct": {t: per_question[t]["correct"] for t in tasks},
        "correct_norm": {t: per_question[t]["correct_norm"] for t in tasks},
        "bytes_transmitted": bytes_sent,
    }


def _method_rows(name: str, result: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A method's row and one row per evaluation variant on the same weights (e.g. ``solora:sum``)."""
    if "per_question" not in result:
        raise ValueError(f"method {name!r}: the run's results hold no per-question outcomes")
    sent = result["bytes_transmitted"]
    rows = {name: _row(result["accuracy"], result["per_question"], tasks, sent)}
    for variant, v in (result.get("variants") or {}).items():
        rows[f"{name}:{variant}"] = _row(v["accuracy"], v["per_question"], tasks, sent)
    return rows


def _diagnostics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method of a seed's run (its results, as in ``results.json``), what explains its accuracy besides it: its
    clusters and their adjusted Rand index against the tasks, the implicit MoE's chosen router and each task's share
    of kept components going to its own expert."""
    keys = ("clusters", "cluster_task_ari", "router", "routing", "published_router")
    out = {name: {key: result.get(key) for key in keys} for name, result in results.items()}
    for name, result in results.items():  # per router: cluster-selection accuracy per task (not the per-prompt picks)
        routers = result.get("routing_diagnostics") or {}
        out[name]["selection"] = {r: d["accuracy"] for r, d in routers.items() if "accuracy" in d} or None
    return out


def _zero_shot(cfg: ExperimentConfig) -> dict[str, Any]:
    """The base model alone on the seed's test questions."""
    from ..evaluation.scoring import evaluate, per_question  # noqa: PLC0415 - torch is only needed once a seed runs
    from ..simulation.setup import load_model, load_tasks  # noqa: PLC0415

    model, tokenizer, _ = load_model(cfg)
    kw = cfg.eval_kwargs()
    results = {t: evaluate(model, tokenizer, task, **kw) for t, task in load_tasks(cfg).items()}
    return _row({t: r["accuracy"] for t, r in results.items()}, per_question(results), cfg.tasks, 0)


def _seed_dir(study_dir: Path, seed: int) -> Path:
    return study_dir / f"seed-{seed}"


def run_seed(settings: StudySettings, study_dir: Path, seed: int, *, progress: bool = True,
             concurrent: int = 1) -> dict[str, Any]:  # fmt: skip
    """Run (or read back) one seed: every method (and its variants) plus the zero-shot row, per question.
    ``concurrent``: how many seeds the machine is split between while this one runs, each on that share of the
    cores (recorded: the study's cost per seed is each seed's wall time divided by it)."""
    from ..simulation.runner import run_experiment  # noqa: PLC0415

    seed_dir = _seed_dir(study_dir, seed)
    done = seed_dir / SEED_RECORD
    if done.exists():
        record = json.loads(done.read_text())
        # the diagnostics as this version reads them from the run's results (seeds finished before a diagnostic was
        # kept get it too), a rerun's methods over the first run's
        found: dict[str, Any] = {}
        for results in (seed_dir / "run/results.json", seed_dir / "rerun/results.json"):
            if results.exists():
                found.update(json.loads(results.read_text())["methods"])
        if found:
            record["diagnostics"] = _diagnostics(found)
        if settings.rerun:
            record = _rerun(settings, seed_dir, record, progress=progress)
        return record
    seed_dir.mkdir(parents=True, exist_ok=True)
    cfg = settings.config.replace(seed=seed)
    started = time.perf_counter()
    summary = run_experiment(cfg, seed_dir / "run", progress=progress)
    run_seconds = time.perf_counter() - started
    methods: dict[str, dict[str, Any]] = {}
    for name, result in summary["methods"].items():
        methods.update(_method_rows(name, result, cfg.tasks))
    extra_started = time.perf_counter()
    if settings.zero_shot:
        methods[ZERO_SHOT] = _zero_shot(cfg)
    record = {
        "seed": seed,
        "methods": methods,
        "seconds": {"run": run_seconds, "extra_rows": time.perf_counter() - extra_started},
        "concurrent": concurrent,
        "n_test": {t: len(next(iter(methods.values()))["correct"][t]) for t in cfg.tasks},
        "diagnostics": _diagnostics(summary["methods"]),
    }
    write_json(done, record)
    return record


def _rerun(settings: StudySettings, seed_dir: Path, record: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """``record`` with the rows and diagnostics of ``settings.rerun``'s methods (and their variants) from a run of
    those methods alone in ``seed_dir/rerun`` (resumed if it is there); ``record["rerun"]`` says which and how long.
    The seed's own record on disk is rewritten with them, so the study's tables read the rerun rows."""
    from ..simulation.runner import run_experiment  # noqa: PLC0415

    cfg = settings.config.replace(seed=record["seed"], methods=tuple(settings.rerun))
    started = time.perf_counter()
    summary = run_experiment(cfg, seed_dir / "rerun", progress=progress)
    fresh: dict[str, Any] = {}
    for name, result in summary["methods"].items():
        fresh.update(_method_rows(name, result, cfg.tasks))
    methods = {k: v for k, v in record["methods"].items() if k.split(":", 1)[0] not in settings.rerun} | fresh
    order = list(settings.config.methods)  # the study's order of methods (each with its variants), then the rest

    def rank(key: str) -> int:
        return order.index(key.split(":", 1)[0]) if key.split(":", 1)[0] in order else len(order)

    methods = dict(sorted(methods.items(), key=lambda kv: rank(kv[0])))
    previous = (record.get("rerun") or {}).get("seconds")
    record = {
        **record,
        "methods": methods,
        "diagnostics": {**(record.get("diagnostics") or {}), **_diagnostics(summary["methods"])},  # as read above
        "rerun": {"methods": list(settings.rerun),
                  "seconds": previous if previous is not None else time.perf_counter() - started},
    }  # fmt: skip
    write_json(seed_dir / SEED_RECORD, record)
    return record


# ---------------------------------------------------------------- the study


def _outcomes(seeds: Sequence[Mapping[str, Any]], tasks: Sequence[str], key: str) -> dict[str, list[np.ndarray]]:
    """Per method, per seed: the scores of the questions that every method scored, in task order."""
    names = [m for m in seeds[0]["methods"] if all(m in s["methods"] for s in seeds)]
    out: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for record in seeds:
        rows = record["methods"]
        for t in tasks:
            scored = [all(rows[m][key][t][i] is not None for m in names) for i in range(len(rows[names[0]][key][t]))]
            for m in names:
                values = rows[m][key][t]
                if len(values) != len(scored):
                    raise ValueError(f"seed {record['seed']}, task {t!r}: methods scored different question sets")
                out[m].append(np.array([v for v, ok in zip(values, scored) if ok], dtype=float))
    # one array per seed: the tasks' questions concatenated
    n_tasks = len(tasks)
    return {m: [np.concatenate(v[i : i + n_tasks]) for i in range(0, len(v), n_tasks)] for m, v in out.items()}


def summarize(settings: StudySettings, seeds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The study's statistics from its per-seed records."""
    tasks = settings.config.tasks
    acc = _outcomes(seeds, tasks, "correct")
    norm = _outcomes(seeds, tasks, "correct_norm")
    stats = compare_methods(acc, contrasts=PREREGISTERED_CONTRASTS, n_boot=settings.n_boot)
    diagnostics = compare_methods(acc, contrasts=DIAGNOSTIC_CONTRASTS, n_boot=settings.n_boot)
    acc_norm = {m: estimate(o, n_boot=settings.n_boot).as_dict() for m, o in norm.items()}
    per_task = {m: {t: float(np.mean([s["methods"][m]["accuracy"][t] for s in seeds])) for t in tasks} for m in acc}
    bytes_sent: dict[str, float | None] = {}
    for m in acc:
        sent = [s["methods"][m]["bytes_transmitted"] for s in seeds]
        bytes_sent[m] = None if None in sent else float(np.mean(sent))
    seconds = [s["seconds"]["run"] + s["seconds"]["extra_rows"] for s in seeds]
    concurrent = [int(s.get("concurrent", 1)) for s in seeds]  # seeds finished before it was recorded ran alone
    return {
        "settings": {
            "config": settings.config.to_dict(),
            "seeds": [s["seed"] for s in seeds],
            "n_boot": settings.n_boot,
        },  # fmt: skip
        "questions_per_seed": next(iter(acc.values()))[0].size if acc else 0,
        "accuracy": stats["methods"],
        "acc_norm": acc_norm,
        "per_task": per_task,
        "bytes_transmitted": bytes_sent,
        "contrasts": stats["contrasts"],
        "skipped_contrasts": stats["skipped"],
        "diagnostic_contrasts": diagnostics["contrasts"],
        "diagnostics": _diagnostics_summary(seeds),
        "seconds_per_seed": seconds,
        "concurrent_per_seed": concurrent,
        "reruns": {str(r["seed"]): r["rerun"] for r in seeds if r.get("rerun")},
    }


def _diagnostics_summary(seeds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, over the seeds: the clusters' adjusted Rand index against the tasks (mean and each seed's) and
    each task's share of the router's kept components going to its own expert (mean, beside the uniform share)."""
    out: dict[str, dict[str, Any]] = {}
    methods = sorted({m for s in seeds for m in s.get("diagnostics", {})})
    for m in methods:
        got = [s["diagnostics"][m] for s in seeds if m in s.get("diagnostics", {})]
        row: dict[str, Any] = {"n_clusters": [len(d["clusters"] or []) for d in got]}
        if got[-1].get("published_router"):
            row["published_router"] = got[-1]["published_router"]
        aris = [d["cluster_task_ari"] for d in got if d.get("cluster_task_ari") is not None]
        if aris:
            row["ari"] = {"mean": float(np.mean(aris)), "per_seed": aris}
        routing = [d["routing"] for d in got if d.get("routing")]
        if routing:
            tasks = list(routing[0])
            row["own_share"] = {t: float(np.mean([r[t]["own_share"] for r in routing if t in r])) for t in tasks}
            row["uniform_share"] = float(np.mean([r[t]["uniform"] for r in routing for t in r]))
        selection = [d["selection"] for d in got if d.get("selection")]
        if selection:  # per router: each task's cluster-selection accuracy (mean over seeds) and the worst seed's
            row["selection"] = {
                r: {"mean": {t: float(np.mean([s[r][t] for s in selection if r in s])) for t in selection[0][r]},
                    "worst": float(min(min(s[r].values()) for s in selection if r in s))}
                for r in selection[0]
            }  # fmt: skip
        out[m] = row
    return out


def _seed_list(seeds: Sequence[int]) -> str:
    """``0, 2, 3, 4, 7`` as ``0, 2–4, 7``: runs of three or more consecutive seeds as a range."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def seeds_for_target(contrast: Mapping[str, Any], target: float = TARGET_DETECTABLE) -> int:
    """Seeds the study would need for ``contrast`` to detect ``target`` (80% power, unadjusted α), projected from
    its observed spread: the standard error of a seed-and-question bootstrap shrinks as 1/√seeds, so the
    detectable difference does too. A projection, as good as the spread seen on the seeds run so far."""
    n = int(contrast["difference"]["n_seeds"])
    return max(n, int(np.ceil(n * (contrast["detectable"] / target) ** 2)))


def _contrast_table(contrasts: Sequence[Mapping[str, Any]], verdict: str) -> list[str]:
    lines = [
        f"| contrast (paired) | difference [95% CI] | p | p (Holm) | detectable (80% power) | "
        f"seeds for {100 * TARGET_DETECTABLE:.0f} points | {verdict} |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in contrasts:
        d = c["difference"]
        lines.append(
            f"| {c['name']} | {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | "
            f"{c['p_value']:.3f} | {c['p_holm']:.3f} | {_pct(c['detectable'])} ({_pct(c['detectable_holm'])} at "
            f"Holm's strictest step) | {seeds_for_target(c)} | {c['verdict']} |"
        )
    return lines


def study_table(result: Mapping[str, Any]) -> str:
    """Markdown: accuracy per method with 95% CIs, then the contrasts with Holm p-values and detectable differences."""
    tasks = result["settings"]["config"]["tasks"]
    lines = [
        "| method | acc [95% CI] | acc_norm [95% CI] | " + " | ".join(tasks) + " | bytes sent (mean per seed) |",
        "|" + "---|" * (4 + len(tasks)),
    ]
    for m, e in result["accuracy"].items():
        n = result["acc_norm"][m]
        b = result["bytes_transmitted"][m]
        lines.append(
            f"| {m} | **{_pct(e['mean'])}** [{_pct(e['low'])}, {_pct(e['high'])}] | {_pct(n['mean'])} "
            f"[{_pct(n['low'])}, {_pct(n['high'])}] | "
            + " | ".join(_pct(result["per_task"][m][t]) for t in tasks)
            + f" | {'—' if b is None else fmt_bytes(b)} |"
        )
    lines += ["", *_contrast_table(result["contrasts"], "paper's claim")]
    if result.get("diagnostic_contrasts"):
        lines += ["", "Diagnostics (exploratory, not pre-registered; Holm-corrected as a family of their own; 'holds' "
                  "= the first is better, 'reversed' = the second is better, at Holm p < 0.05):", "",
                  *_contrast_table(result["diagnostic_contrasts"], "first better?")]  # fmt: skip
    diag = result.get("diagnostics") or {}
    aris = [f"`{m}` {d['ari']['mean']:.2f} ({'/'.join(map(str, d['n_clusters']))} clusters)"
            for m, d in diag.items() if "ari" in d]  # fmt: skip
    if aris:
        lines += ["", "Clusters against the tasks (adjusted Rand index, mean over seeds; 1 = one cluster per task, "
                  "0 = unrelated; clusters per seed): " + ", ".join(aris) + "."]  # fmt: skip
    shares = [f"`{m}` " + ", ".join(f"{t} {v:.2f}" for t, v in d["own_share"].items()) + f" (uniform {d['uniform_share']:.2f})"
              for m, d in diag.items() if "own_share" in d]  # fmt: skip
    if shares:
        lines += ["", "Share of the router's kept components going to the task's own expert (mean over seeds): "
                  + "; ".join(shares) + "."]  # fmt: skip
    for m, d in diag.items():
        if "selection" not in d:
            continue
        if d.get("published_router"):
            lines += ["", f"`{m}`'s row is its published MoE under its default router `{d['published_router']}`; "
                      f"`{m}:<router>` rows score the same experts under another router."]  # fmt: skip
        lines += ["", f"`{m}`'s routing on the test prompts: cluster-selection accuracy per task against the cluster "
                  "holding the task (mean over seeds), and the worst task on the worst seed:", "",
                  "| router | " + " | ".join(tasks) + " | worst |", "|---|" + "---|" * (len(tasks) + 1)]  # fmt: skip
        for r, sel in d["selection"].items():
            cells = [f"{100 * sel['mean'][t]:.0f}%" if t in sel["mean"] else "–" for t in tasks]
            lines.append(f"| {r} | " + " | ".join(cells) + f" | {100 * sel['worst']:.0f}% |")
    seeds = result["settings"]["seeds"]
    seconds = result["seconds_per_seed"]
    concurrent = result["concurrent_per_seed"]
    wall = f"{np.mean(seconds) / 60:.1f} min per seed (min {min(seconds) / 60:.1f}, max {max(seconds) / 60:.1f})"
    if max(concurrent) == 1:
        cost = f"Cost: {wall}."
    else:  # a seed that shared the machine with k-1 others used 1/k of it for its wall time
        shared = [s for s, k in zip(seeds, concurrent) if k > 1]
        machine = np.mean([t / k for t, k in zip(seconds, concurrent)]) / 60
        at_once = "/".join(map(str, sorted({k for k in concurrent if k > 1})))
        cost = (f"Cost: {machine:.1f} min of the machine per seed (each seed's wall time times the share of the "
                f"machine it ran on; seeds {_seed_list(shared)} ran {at_once} at a time, each on 1/{at_once} of "
                f"the cores); wall time {wall}.")  # fmt: skip
    lines += [
        "",
        f"Accuracy in % over {len(seeds)} seeds ({_seed_list(seeds)}; each also resamples the data split) × "
        f"{result['questions_per_seed']} test questions per seed ({len(tasks)} tasks); intervals from a hierarchical "
        f"bootstrap (seeds, then questions; {result['settings']['n_boot']} replicates). Contrasts are paired per "
        "question and Holm-corrected as one family; 'holds' / 'reversed' = Holm p < 0.05 in the paper's / the "
        "opposite direction, else 'undecided'. Detectable = the true difference found with 80% power at α = 0.05. "
        + cost,
    ]
    reruns = result.get("reruns") or {}
    if reruns:
        names = sorted({m for r in reruns.values() for m in r["methods"]})
        minutes = [r["seconds"] / 60 for r in reruns.values()]
        lines.append(f"Rerun (`--rerun {','.join(names)}`, their rows from `seed-<s>/rerun`) on seeds "
                     f"{', '.join(reruns)}: {np.mean(minutes):.1f} min per seed (min {min(minutes):.1f}, max "
                     f"{max(minutes):.1f}); the other rows are the seeds' first runs.")  # fmt: skip
    if result["skipped_contrasts"]:
        lines.append(f"Not computed (a method is missing): {', '.join(result['skipped_contrasts'])}.")
    return "\n".join(lines) + "\n"


def _plots(result: Mapping[str, Any], study_dir: Path) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    names = list(result["accuracy"])
    means = np.array([result["accuracy"][m]["mean"] for m in names]) * 100
    err = np.array([[result["accuracy"][m]["mean"] - result["accuracy"][m]["low"],
                     result["accuracy"][m]["high"] - result["accuracy"][m]["mean"]] for m in names]).T * 100  # fmt: skip
    paths = {"accuracy": study_dir / "accuracy_ci.png", "bytes": study_dir / "accuracy_vs_bytes.png"}
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), means, yerr=err, capsize=4, color="#7aa6c2")
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_title(f"Accuracy per method ({len(result['settings']['seeds'])} seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["accuracy"])
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, m in enumerate(names):
        b = result["bytes_transmitted"][m]
        if b is None:
            continue
        marker = "osD^v"[i // 10 % 5]  # the colour cycle has 10 colours: a new marker after each 10 methods
        ax.errorbar([max(b, 1.0)], [means[i]], yerr=err[:, i : i + 1], fmt=marker, capsize=4, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent over the whole run (all links; 1 = nothing sent)")
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_title("Accuracy vs cumulative bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["bytes"])
    return paths


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_worker(threads: int, setup: Callable[[], None] | None) -> None:
    """A study worker's initializer: its share of the cores, set before torch is imported (it is imported lazily)
    so that OpenMP and MKL size their pools to it too; then the caller's ``setup`` (e.g. the CLI's quieting of
    the libraries' warnings and progress bars, which a spawned process does not inherit)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    if setup is not None:
        setup()


def _run_seeds_in_parallel(settings: StudySettings, study_dir: Path, seeds: Sequence[int], *, progress: bool,
                           worker_setup: Callable[[], None] | None) -> None:  # fmt: skip
    """Run ``seeds`` ``settings.jobs`` at a time, each in a fresh process (spawned: no torch state is forked) on
    ``cores // jobs`` threads, writing each seed's record as :func:`run_seed` does. A seed that fails does not stop
    the others (each is resumable); the first failure is raised once they are done."""
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415

    from tqdm.auto import tqdm  # noqa: PLC0415

    jobs = min(settings.jobs, len(seeds))
    threads = max(1, _usable_cores() // jobs)
    failures: list[tuple[int, BaseException]] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_start_worker, initargs=(threads, worker_setup)
    ) as pool:
        futures = {pool.submit(run_seed, settings, study_dir, s, progress=False, concurrent=jobs): s for s in seeds}
        bar = tqdm(
            total=len(seeds),
            desc=f"seeds ({jobs} at a time, {threads} thread{'s' if threads > 1 else ''} each)",
            disable=not progress,
        )
        try:
            for future in as_completed(futures):
                if (error := future.exception()) is not None:
                    failures.append((futures[future], error))
                bar.update()
        except BaseException:  # Ctrl-C: finished seeds are kept, the running ones resume on the next call
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
    if failures:  # the first failure as it was raised (a user error stays one line), naming every failed seed
        error = failures[0][1]
        error.add_note(f"failed seeds: {', '.join(str(s) for s, _ in failures)} of {len(seeds)} (rerun to resume)")
        raise error


def run_study(settings: StudySettings, study_dir: str | Path, *, progress: bool = True,
              worker_setup: Callable[[], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) every seed of the study, then write study.json, study.md and the two plots.

    With ``settings.jobs > 1`` the pending seeds run in spawned worker processes, each calling ``worker_setup`` (a
    module-level function: it is pickled by name) once before its first seed; their own progress bars are off,
    one bar counts the seeds."""
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    marker = study_dir / "study_settings.json"
    if marker.exists():
        stored = json.loads(marker.read_text())
        if stored["fingerprint"] != settings.fingerprint():
            raise ValueError(f"{study_dir} holds a study with other settings: use another --run-dir or delete it")
    write_json(marker, {"fingerprint": settings.fingerprint(), "config": settings.config.to_dict(),
                         "seeds": list(settings.seeds)})  # fmt: skip
    pending = [s for s in settings.seeds if not (_seed_dir(study_dir, s) / SEED_RECORD).exists()]
    if settings.jobs > 1 and len(pending) > 1:
        _run_seeds_in_parallel(settings, study_dir, pending, progress=progress, worker_setup=worker_setup)
    records = [run_seed(settings, study_dir, s, progress=progress) for s in settings.seeds]  # read back if finished
    result = summarize(settings, records)
    write_json(study_dir / "study.json", result)
    (study_dir / "study.md").write_text("# Study\n\n" + study_table(result))
    result["plots"] = {k: str(v) for k, v in _plots(result, study_dir).items()}
    return result
