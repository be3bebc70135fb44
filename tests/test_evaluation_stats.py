"""Statistics of the study: the hierarchical bootstrap covers a known difference at its stated rate; Holm's method."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sorlora.evaluation.stats import (
    PREREGISTERED_CONTRASTS,
    bootstrap_p_value,
    compare_methods,
    estimate,
    grand_mean,
    hierarchical_bootstrap,
    holm,
    paired_differences,
    planned_detectable_difference,
    smallest_detectable_difference,
)


def simulated_differences(rng, *, difference, n_seeds, n_questions, seed_sd, discordance=0.3):
    """Per-question paired differences (-1, 0, 1) whose population mean is ``difference``: each seed's true
    difference is drawn around it, and a share ``discordance`` of questions is answered differently."""
    half = discordance / 2
    out = []
    for _ in range(n_seeds):
        d = difference + rng.normal(0, seed_sd)
        u = rng.random(n_questions)
        out.append(np.where(u < half + d / 2, 1.0, np.where(u < 2 * half, -1.0, 0.0)))
    return out


@pytest.mark.parametrize(("n_seeds", "seed_sd"), [(5, 0.02), (1, 0.0)])
def test_bootstrap_interval_covers_a_known_difference_at_the_stated_rate(n_seeds, seed_sd):
    rng = np.random.default_rng(2026)
    studies, truth = 200, 0.05
    hits = 0
    for i in range(studies):
        diffs = simulated_differences(rng, difference=truth, n_seeds=n_seeds, n_questions=120, seed_sd=seed_sd)
        e = estimate(diffs, level=0.95, n_boot=600, seed=i)
        hits += e.low <= truth <= e.high
    tolerance = 3 * math.sqrt(0.95 * 0.05 / studies)  # 3 binomial standard errors: [0.904, 0.996]
    assert abs(hits / studies - 0.95) <= tolerance, f"coverage {hits / studies:.3f}"


def test_naive_two_level_resampling_would_over_cover_and_shrinking_fixes_it():
    """With no real seed spread the bootstrap's spread matches the true standard error of the grand mean."""
    rng = np.random.default_rng(3)
    diffs = simulated_differences(rng, difference=0.0, n_seeds=5, n_questions=400, seed_sd=0.0)
    boot = hierarchical_bootstrap(diffs, n_boot=4000, seed=1)
    true_se = math.sqrt(0.3 / (5 * 400))  # variance of one difference is the discordance (0.3) at mean 0
    assert boot.std() == pytest.approx(true_se, rel=0.15)
    assert boot.mean() == pytest.approx(grand_mean(diffs), abs=0.3 * true_se)


def test_one_seed_resamples_questions_only_and_reproduces():
    values = [np.array([1.0, 0.0, 1.0, 1.0])]
    a = hierarchical_bootstrap(values, n_boot=500, seed=4)
    assert np.array_equal(a, hierarchical_bootstrap(values, n_boot=500, seed=4))
    assert set(np.round(a * 4).astype(int)) <= {0, 1, 2, 3, 4}
    assert a.std() == pytest.approx(math.sqrt(0.75 * 0.25 / 4), rel=0.15)


def test_holm_on_the_textbook_example():
    """Holm (1979) as in the Wikipedia example: four hypotheses at alpha 0.05; only H1 and H4 are rejected."""
    adjusted = holm({"H1": 0.01, "H2": 0.04, "H3": 0.03, "H4": 0.005})
    assert adjusted == pytest.approx({"H1": 0.03, "H2": 0.06, "H3": 0.06, "H4": 0.02})
    assert {h for h, p in adjusted.items() if p < 0.05} == {"H1", "H4"}
    assert holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm({"a": 1.5})


def test_smallest_detectable_difference():
    assert smallest_detectable_difference(0.01) == pytest.approx(0.0280, abs=2e-4)  # (1.96 + 0.84) * se
    assert smallest_detectable_difference(0.01, alpha=0.01, power=0.9) == pytest.approx(0.0386, abs=2e-4)
    # the README's single-run table: 160 questions, one seed, ~30% discordant -> about 12 points
    assert planned_detectable_difference(160, 1, discordance=0.3, seed_sd=0.0) == pytest.approx(0.121, abs=0.002)
    # the study preset: 5 seeds x 240 questions -> about 5 points
    assert planned_detectable_difference(240, 5, discordance=0.3, seed_sd=0.02) < 0.055


def test_bootstrap_p_value_is_small_for_a_clear_difference_and_large_for_none():
    rng = np.random.default_rng(5)
    clear = simulated_differences(rng, difference=0.15, n_seeds=4, n_questions=200, seed_sd=0.0)
    none = simulated_differences(rng, difference=0.0, n_seeds=4, n_questions=200, seed_sd=0.0)
    assert bootstrap_p_value(hierarchical_bootstrap(clear, n_boot=2000), grand_mean(clear)) < 0.01
    assert bootstrap_p_value(hierarchical_bootstrap(none, n_boot=2000), grand_mean(none)) > 0.05


def test_paired_differences_need_the_same_seeds_and_questions():
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences([np.ones(3)], [np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match="same questions"):
        paired_differences([np.ones(3)], [np.ones(4)])
    assert paired_differences([np.array([1, 0])], [np.array([0, 0])])[0].tolist() == [1.0, 0.0]


def test_compare_methods_gives_verdicts_per_contrast():
    rng = np.random.default_rng(6)
    base = [rng.random(300) < 0.5 for _ in range(5)]

    def flip(outcomes, p_fix):  # fix a share of wrong answers (a better method, paired with base)
        return [np.where(~o & (rng.random(o.size) < p_fix), True, o).astype(float) for o in outcomes]

    outcomes = {"lora": [o.astype(float) for o in base], "solora": flip(base, 0.4), "solora-single": flip(base, 0.0)}
    outcomes["lori"] = [o.copy() for o in outcomes["lora"]]
    result = compare_methods(outcomes, n_boot=1000)
    by_name = {c["name"]: c for c in result["contrasts"]}
    assert by_name["solora − lora"]["verdict"] == "holds"
    assert by_name["solora − solora-single"]["verdict"] == "holds"
    assert by_name["solora-single − lora"]["verdict"] == "undecided"
    assert by_name["lori − lora"]["verdict"] == "undecided" and by_name["lori − lora"]["difference"]["mean"] == 0
    assert result["skipped"] == ["solora − solora:sum"]
    assert all(c["p_holm"] >= c["p_value"] for c in result["contrasts"])
    assert all(c["detectable_holm"] > c["detectable"] > 0 for c in result["contrasts"] if c["difference"]["se"])
    assert by_name["lori − lora"]["detectable"] == 0 and by_name["lori − lora"]["p_value"] == 1  # identical answers
    lora = result["methods"]["lora"]
    assert lora["low"] < lora["mean"] < lora["high"] and lora["n_seeds"] == 5 and lora["n_questions"] == 300
    reversed_result = compare_methods({"lora": outcomes["solora"], "solora": outcomes["lora"]}, n_boot=1000)
    assert reversed_result["contrasts"][0]["verdict"] == "reversed"
    assert len(PREREGISTERED_CONTRASTS) == 5


def test_wilson_interval_is_not_degenerate_on_few_questions_and_matches_known_values():
    from sorlora.evaluation.stats import wilson_interval

    low, high = wilson_interval(0, 2)
    assert low == 0.0 and 0.65 < high < 0.66, "two wrong answers: not a point at 0"
    low, high = wilson_interval(59, 100)
    assert abs(low - 0.4920) < 1e-3 and abs(high - 0.6813) < 1e-3  # the textbook Wilson interval of 59/100
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(100, 100)[0] > 0.96
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
