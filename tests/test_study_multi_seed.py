"""The multi-seed study: statistics and outputs from per-seed records, and end to end on a tiny model (resumable)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from sorlora.simulation.config import preset
from sorlora.study.study import STUDY_PRESETS, StudySettings, run_study, seeds_for_target, study_table, summarize

from .test_simulation_runner import TINY


def _record(seed, rng, tasks, accuracies):
    methods = {}
    for name, p in accuracies.items():
        correct = {t: [int(x) for x in rng.random(30) < p] for t in tasks}
        correct[tasks[0]][0] = None  # a truncated question: skipped for every method
        methods[name] = {
            "accuracy": {t: float(np.mean([c for c in v if c is not None])) for t, v in correct.items()},
            "correct": correct,
            "correct_norm": correct,
            "bytes_transmitted": 0 if name == "zero-shot" else 1000 * (1 + len(name)),
        }
    for t in tasks:
        for m in methods.values():
            m["correct"][t][0] = None if t == tasks[0] else m["correct"][t][0]
    return {"seed": seed, "methods": methods, "seconds": {"run": 60.0, "extra_rows": 6.0}}


def test_summary_table_and_contrasts_from_seed_records(tmp_path):
    rng = np.random.default_rng(0)
    tasks = ("a", "b")
    settings = StudySettings(TINY.replace(tasks=tasks), seeds=(0, 1, 2), n_boot=500)
    accuracies = {"lora": 0.5, "lori": 0.5, "solora-single": 0.55, "solora": 0.9, "solora:sum": 0.6, "zero-shot": 0.3}
    records = [_record(s, rng, tasks, accuracies) for s in settings.seeds]
    result = summarize(settings, records)
    assert result["questions_per_seed"] == 59, "the question skipped for every method is left out"
    assert set(result["accuracy"]) == set(accuracies)
    names = [c["name"] for c in result["contrasts"]]
    assert names == ["solora − solora-single", "solora − lora", "solora-single − lora", "lori − lora",
                     "solora − solora:sum"]  # fmt: skip
    by_name = {c["name"]: c for c in result["contrasts"]}
    assert by_name["solora − lora"]["verdict"] == "holds"
    assert by_name["solora − lora"]["difference"]["low"] > 0.2
    table = study_table(result)
    assert "solora − lora" in table and "95% CI" in table and "detectable" in table and "3 seeds" in table
    assert "1.1 min per seed" in table
    # seeds for 5 points: the detectable difference shrinks as 1/sqrt(seeds), projected from these 3 seeds
    row = next(line for line in table.splitlines() if line.startswith("| solora − lora |")).split(" | ")
    detectable = by_name["solora − lora"]["detectable"]
    assert row[4].startswith(f"{100 * detectable:.1f} ") and int(row[5]) == max(
        3, math.ceil(3 * (detectable / 0.05) ** 2)
    )
    assert seeds_for_target({"difference": {"n_seeds": 5}, "detectable": 0.109}) == 24  # the README's 5-seed study


def test_outcomes_must_cover_the_same_questions():
    rng = np.random.default_rng(1)
    settings = StudySettings(TINY.replace(tasks=("a",)), seeds=(0,), n_boot=100)
    record = _record(0, rng, ("a",), {"lora": 0.5, "solora": 0.6})
    record["methods"]["lora"]["correct"]["a"] = record["methods"]["lora"]["correct"]["a"][:-1]
    with pytest.raises(ValueError, match="different question sets"):
        summarize(settings, [record])


def test_study_preset_is_sized_as_documented():
    study = STUDY_PRESETS["study"]
    cfg = study.config
    assert cfg.tasks == ("rotten_tomatoes", "review_or_plot", "word_polarity", "virtue_or_vice"), "the pilot's best"
    kept = json.loads((Path(__file__).parents[1] / "results/pilot/pilot.json").read_text())["kept"]
    assert set(cfg.tasks) <= set(kept) and len(cfg.tasks) >= 4, "at least 4 tasks, each kept by today's pilot"
    assert cfg.tasks == preset("demo").tasks, "the demo runs the study's tasks"
    assert cfg.n_test * len(cfg.tasks) == 480 and (cfg.rounds, cfg.local_steps) == (8, 4)
    from sorlora.evaluation.stats import PREREGISTERED_CONTRASTS

    needed = {m for pair in PREREGISTERED_CONTRASTS for m in pair if ":" not in m}
    assert needed == set(cfg.methods), "exactly the methods of the pre-registered contrasts"
    assert cfg.peers == 2 * len(cfg.tasks), "two peers per task: the clusters can follow the tasks"
    assert cfg.score_members == "dealt"
    pilot = STUDY_PRESETS["pilot"].config
    assert (pilot.rounds, pilot.local_steps, pilot.n_validation) == (cfg.rounds, cfg.local_steps, 60)


def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch):
    cfg = TINY.replace(methods=("lora", "lori", "solora-single", "solora"), rounds=1, n_validation=4)
    settings = StudySettings(cfg, seeds=(0, 1), n_boot=300)
    result = run_study(settings, tmp_path, progress=False)
    for name in ("study.json", "study.md", "accuracy_ci.png", "accuracy_vs_bytes.png", "study_settings.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    stored = json.loads((tmp_path / "study.json").read_text())
    assert stored["settings"]["seeds"] == [0, 1]
    from sorlora.evaluation.final_models import EVAL_ANCHORS, EVAL_ROUTERS

    routers = {f"solora:{r}" for r in EVAL_ROUTERS if r != cfg.router}  # the published router is solora's own row
    routers |= {f"solora:{a}" for a in EVAL_ANCHORS}  # the same experts under PEFT's Arrow
    assert {"lora", "lori", "solora-single", "solora", "zero-shot"} | routers == set(stored["accuracy"]), (
        "every method, the MoE's weights under every other router (sum and hard included) and Arrow, and the base alone"
    )
    assert [c["name"] for c in stored["contrasts"]][-1] == "solora − solora:sum" and not stored["skipped_contrasts"]
    assert stored["questions_per_seed"] == cfg.n_test * len(cfg.tasks)
    assert len(result["contrasts"]) == 5
    # the exploratory family: those whose methods ran, Holm-corrected on their own
    assert [c["name"] for c in stored["diagnostic_contrasts"]] == [
        "solora − solora:hard", "solora − solora:implicit", "solora − zero-shot", "lora − zero-shot"]  # fmt: skip
    diag = stored["diagnostics"]
    assert len(diag["solora"]["ari"]["per_seed"]) == 2 and diag["solora-single"]["ari"]["mean"] == 0.0
    assert set(diag["solora"]["own_share"]) == set(cfg.tasks) and "lora" in diag and "ari" not in diag["lora"]
    selection = diag["solora"]["selection"]
    assert set(selection) >= {"implicit", "sequence", "hard"} and set(selection["hard"]["mean"]) == set(cfg.tasks)
    assert selection["hard"]["worst"] == 1.0, "routing by the true task picks the task's cluster for every prompt"
    assert all(0.0 <= v <= 1.0 for sel in selection.values() for v in sel["mean"].values())
    table = (tmp_path / "study.md").read_text()
    assert f"under its default router `{cfg.router}`" in table
    assert "cluster-selection accuracy per task" in table and "| sequence |" in table
    assert "Diagnostics (exploratory" in table and "adjusted Rand index" in table and "own expert" in table
    seeds = [json.loads((tmp_path / f"seed-{s}" / "seed_result.json").read_text()) for s in (0, 1)]
    assert seeds[0]["methods"]["lora"]["correct"] != seeds[1]["methods"]["lora"]["correct"] or (
        seeds[0]["methods"]["lora"]["accuracy"] != seeds[1]["methods"]["lora"]["accuracy"]
    )
    # resuming: finished seeds are read back, not redone (their files stay untouched)
    stamps = {s: os.stat(tmp_path / f"seed-{s}" / "seed_result.json").st_mtime_ns for s in (0, 1)}

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished seed was run again")

    monkeypatch.setattr("sorlora.simulation.runner.run_experiment", no_rerun)
    again = run_study(settings, tmp_path, progress=False)
    assert {s: os.stat(tmp_path / f"seed-{s}" / "seed_result.json").st_mtime_ns for s in (0, 1)} == stamps
    assert again["accuracy"] == result["accuracy"]
    with pytest.raises(ValueError, match="other settings"):
        run_study(StudySettings(cfg.replace(rounds=2), seeds=(0,)), tmp_path, progress=False)
    # rerunning one method on the finished seeds: its rows come from seed-<s>/rerun, the others' stay
    monkeypatch.undo()
    rerun = run_study(dataclasses.replace(settings, rerun=("lora",)), tmp_path, progress=False)
    for s in (0, 1):
        record = json.loads((tmp_path / f"seed-{s}" / "seed_result.json").read_text())
        assert record["rerun"]["methods"] == ["lora"] and record["rerun"]["seconds"] > 0
        assert (tmp_path / f"seed-{s}" / "rerun" / "results.json").is_file()
        assert record["methods"]["lori"] == seeds[s]["methods"]["lori"], "the other methods' rows are kept"
        assert record["methods"]["lora"]["correct"] == seeds[s]["methods"]["lora"]["correct"], (
            "the same seed trains the same lora again (common random numbers)"
        )
    assert rerun["accuracy"]["lora"] == result["accuracy"]["lora"]
    assert list(rerun["accuracy"]) == list(result["accuracy"]), "the rerun rows keep their place in the tables"
    assert set(rerun["reruns"]) == {"0", "1"} and "Rerun (`--rerun lora`" in (tmp_path / "study.md").read_text()


def test_seed_lists_show_runs_as_ranges():
    from sorlora.study.study import _seed_list

    assert _seed_list([0, 2, 3, 4, 7, 8, 10]) == "0, 2–4, 7, 8, 10" and _seed_list(list(range(18))) == "0–17"


def test_seeds_run_in_parallel_processes_give_the_same_records_and_a_failed_seed_stops_no_other(tmp_path):
    """--jobs 2: the seeds run two at a time in spawned processes on half the cores each; each seed's outcomes are
    those of a seed run alone (common random numbers), its record says it shared the machine, and a seed that fails
    (here its folder is a file) is raised once the others have finished, naming it."""
    cfg = TINY.replace(methods=("lora", "solora"), rounds=1)
    alone = tmp_path / "alone"
    run_study(StudySettings(cfg, seeds=(0, 1), n_boot=200), alone, progress=False)
    parallel = tmp_path / "parallel"
    parallel.mkdir()
    (parallel / "seed-2").write_text("not a folder")
    with pytest.raises(FileExistsError) as failed:
        run_study(StudySettings(cfg, seeds=(0, 1, 2), n_boot=200, jobs=2), parallel, progress=False)
    assert "failed seeds: 2 of 3" in "".join(failed.value.__notes__)
    for s in (0, 1):
        one = json.loads((alone / f"seed-{s}" / "seed_result.json").read_text())
        two = json.loads((parallel / f"seed-{s}" / "seed_result.json").read_text())
        assert (one["concurrent"], two["concurrent"]) == (1, 2)
        assert two["methods"]["lora"]["correct"] == one["methods"]["lora"]["correct"]
        assert two["methods"]["solora"]["correct"] == one["methods"]["solora"]["correct"]
    (parallel / "seed-2").unlink()
    result = run_study(StudySettings(cfg, seeds=(0, 1, 2), n_boot=200, jobs=2), parallel, progress=False)
    assert result["concurrent_per_seed"] == [2, 2, 1], "the last seed, alone to run, ran in-process on every core"
    table = (parallel / "study.md").read_text()
    wall = result["seconds_per_seed"]
    machine = (wall[0] / 2 + wall[1] / 2 + wall[2]) / 3 / 60
    assert f"Cost: {machine:.1f} min of the machine per seed" in table and "seeds 0, 1 ran 2 at a time" in table
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        StudySettings(cfg, jobs=0)


def test_the_readmes_sorlora_commands_parse_and_name_known_presets():
    """Every `sorlora ...` command line in a README bash block parses, and its presets exist (no model loads)."""
    import re
    import shlex
    from pathlib import Path

    from sorlora.cli import build_parser
    from sorlora.simulation.config import PRESETS

    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            words = shlex.split(line) if ".venv/bin/sorlora " in line else []
            if words:
                commands.append(words[[w.endswith(".venv/bin/sorlora") for w in words].index(True) + 1 :])
    studies = [c for c in commands if c[0] in ("study", "pilot")]
    assert len(studies) >= 2, "the README shows how the headline study and its pilot were run"
    parser = build_parser()
    for argv in commands:
        if argv[0] in ("collab", "peer", "hub-serve") and any("<" in w for w in argv):
            continue  # placeholders for the user's own values
        args = parser.parse_args(argv)
        if argv[0] in ("study", "pilot"):
            assert args.preset in STUDY_PRESETS, argv
        elif getattr(args, "preset", None):
            assert args.preset in PRESETS, argv
