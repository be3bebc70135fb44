"""Statistics of a multi-seed study: paired per-question comparisons, a hierarchical bootstrap, Holm's correction.

A study runs every method on the same questions of each seed (each seed also resamples the data split). For one
method, ``outcomes[s]`` is the array of per-question scores (1 correct, 0 wrong) of seed ``s``; two methods are
compared *paired*, question by question (the per-question difference is -1, 0 or 1), so the noise that both share
(which questions are easy) cancels. Uncertainty has two levels — seeds (data split, initialisation, training
order) and questions within a seed — and the hierarchical bootstrap resamples both: seeds with replacement, then
questions with replacement within every drawn seed. Pre-registered contrasts are tested together with Holm's
step-down correction, and every contrast states the smallest difference the study could detect with 80% power.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "PREREGISTERED_CONTRASTS",
    "DIAGNOSTIC_CONTRASTS",
    "Contrast",
    "Estimate",
    "hierarchical_bootstrap",
    "estimate",
    "paired_differences",
    "bootstrap_p_value",
    "holm",
    "smallest_detectable_difference",
    "planned_detectable_difference",
    "compare_methods",
    "adjusted_rand_index",
    "wilson_interval",
]

# (a, b): "a beats b" is the paper's claim. ``solora:sum`` is the solora run's experts on the same weights with
# every component kept (the plain sum of all clusters' updates) instead of the implicit-MoE router.
PREREGISTERED_CONTRASTS: tuple[tuple[str, str], ...] = (
    ("solora", "solora-single"),
    ("solora", "lora"),
    ("solora-single", "lora"),
    ("lori", "lora"),
    ("solora", "solora:sum"),
)

# Exploratory contrasts of the implicit MoE's diagnostics (why it may lose), a Holm family of their own and never
# mixed with the pre-registered one: the default router (the ``solora`` row) against hard routing by the true task
# and against the paper's implicit router; the upper bound against the router; the
# collision-free union against masked averaging in one cluster; co-training across clusters against the paper's
# one exchange; and whether training helped at all (against the base model alone).
DIAGNOSTIC_CONTRASTS: tuple[tuple[str, str], ...] = (
    ("solora", "solora:hard"),  # the default router against the oracle by task id (goal: within 1 point)
    ("solora", "solora:implicit"),  # the default router against the paper's per-token top-k
    ("oracle", "solora"),
    ("solora-union", "solora-single"),
    ("solora-cotrain", "solora"),
    ("solora", "zero-shot"),
    ("lora", "zero-shot"),
)

Outcomes = Sequence[np.ndarray]  # one array of per-question scores per seed


def _as_arrays(outcomes: Outcomes) -> list[np.ndarray]:
    arrays = [np.asarray(o, dtype=float) for o in outcomes]
    if not arrays:
        raise ValueError("need at least one seed")
    for s, a in enumerate(arrays):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"seed {s}: need a non-empty 1-d array of per-question scores, got shape {a.shape}")
    return arrays


def grand_mean(outcomes: Outcomes) -> float:
    """Mean over seeds of each seed's mean over questions (every seed weighs the same)."""
    return float(np.mean([a.mean() for a in _as_arrays(outcomes)]))


def hierarchical_bootstrap(outcomes: Outcomes, *, n_boot: int = 4000, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap replicates of :func:`grand_mean`: draw seeds with replacement, then questions with
    replacement within each drawn seed.

    Resampling both levels naively counts the question noise twice (a seed's mean already carries it), which makes
    intervals far too wide when seeds differ little. So the drawn seeds' means are first shrunk towards the grand
    mean until their spread matches the estimated between-seed variance (the two-stage bootstrap of Davison &
    Hinkley 1997, §3.8): replicate = grand mean + λ (seed mean − grand mean) + (resampled question mean − seed
    mean), with λ² = max(0, var(seed means) − mean within-seed variance of a mean) / var(seed means). With one
    seed only the questions are resampled.
    """
    arrays = _as_arrays(outcomes)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n_seeds = len(arrays)
    means = np.array([a.mean() for a in arrays])
    centre = means.mean()
    shrink = 0.0
    if n_seeds > 1 and means.var() > 0:
        within = np.mean([a.var() / a.size for a in arrays])
        between = max(0.0, float(means.var(ddof=1)) - within)
        shrink = float(np.sqrt(between / means.var()))
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    totals = np.zeros(n_boot)
    for s, values in enumerate(arrays):
        # every (replicate, position) that drew seed s gets its own resample of seed s's questions
        rows, _ = np.nonzero(picks == s)
        if rows.size == 0:
            continue
        draws = rng.integers(0, values.size, size=(rows.size, values.size))
        shrunk = centre + shrink * (means[s] - centre)
        np.add.at(totals, rows, shrunk + values[draws].mean(axis=1) - means[s])
    return totals / n_seeds


@dataclass(frozen=True)
class Estimate:
    """A mean with its hierarchical-bootstrap standard error and percentile confidence interval."""

    mean: float
    se: float
    low: float
    high: float
    level: float
    n_seeds: int
    n_questions: int  # per seed (the smallest seed's count)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(outcomes: Outcomes, *, level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> Estimate:
    """The grand mean of ``outcomes`` with a ``level`` percentile interval from :func:`hierarchical_bootstrap`."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arrays = _as_arrays(outcomes)
    boot = hierarchical_bootstrap(arrays, n_boot=n_boot, seed=seed)
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return Estimate(grand_mean(arrays), float(boot.std(ddof=1)) if n_boot > 1 else float("nan"), float(low),
                    float(high), level, len(arrays), min(a.size for a in arrays))  # fmt: skip


def paired_differences(a: Outcomes, b: Outcomes) -> list[np.ndarray]:
    """Per seed, per question: ``a - b`` (both methods scored on the same questions in the same order)."""
    a, b = _as_arrays(a), _as_arrays(b)
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same seeds: {len(a)} vs {len(b)}")
    for s, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"seed {s}: paired comparison needs the same questions: {x.size} vs {y.size}")
    return [x - y for x, y in zip(a, b)]


def bootstrap_p_value(boot: np.ndarray, observed: float) -> float:
    """Two-sided p-value of "no difference" from bootstrap replicates, shifted to the null (Hall & Wilson 1991)."""
    extreme = np.abs(boot - observed) >= abs(observed) - 1e-12
    return float((1 + extreme.sum()) / (1 + boot.size))


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error control; Holm 1979), monotone and capped at 1."""
    items = sorted(p_values.items(), key=lambda kv: kv[1])
    m = len(items)
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, (name, p) in enumerate(items):
        if not 0 <= p <= 1:
            raise ValueError(f"p-value of {name!r} must be in [0, 1], got {p}")
        running = max(running, min(1.0, (m - i) * p))
        adjusted[name] = running
    return {name: adjusted[name] for name in p_values}


def smallest_detectable_difference(se: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The true difference a two-sided level-``alpha`` test with standard error ``se`` detects with ``power``:
    (z_{1-alpha/2} + z_{power}) * se (2.80 se at the defaults)."""
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    z = NormalDist().inv_cdf
    return float((z(1 - alpha / 2) + z(power)) * se)


def planned_detectable_difference(
    n_questions: int,
    n_seeds: int,
    *,
    discordance: float = 0.3,
    seed_sd: float = 0.02,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Design-time :func:`smallest_detectable_difference` of a paired contrast.

    ``discordance`` is the share of questions the two methods answer differently (the variance of a per-question
    difference is at most that), ``seed_sd`` the spread of the true difference between seeds, ``n_questions`` the
    questions per seed.
    """
    if n_questions < 1 or n_seeds < 1:
        raise ValueError(f"need n_questions, n_seeds >= 1, got {n_questions}, {n_seeds}")
    se = np.sqrt((discordance / n_questions + seed_sd**2) / n_seeds)
    return smallest_detectable_difference(float(se), alpha=alpha, power=power)


@dataclass(frozen=True)
class Contrast:
    """One pre-registered comparison ``a - b`` (paired), tested with Holm's correction across the family."""

    a: str
    b: str
    difference: Estimate
    p_value: float
    p_holm: float
    detectable: float  # smallest true difference detected with 80% power at alpha (unadjusted)
    detectable_holm: float  # the same at alpha / (number of contrasts), Holm's strictest step
    verdict: str  # "holds" (a > b, Holm p < alpha), "reversed" (a < b, Holm p < alpha) or "undecided"

    @property
    def name(self) -> str:
        return f"{self.a} − {self.b}"

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "name": self.name, "difference": self.difference.as_dict(),
                **{k: getattr(self, k) for k in ("p_value", "p_holm", "detectable", "detectable_holm", "verdict")}}  # fmt: skip


def compare_methods(
    outcomes: Mapping[str, Outcomes],
    *,
    contrasts: Sequence[tuple[str, str]] = PREREGISTERED_CONTRASTS,
    alpha: float = 0.05,
    power: float = 0.8,
    level: float = 0.95,
    n_boot: int = 4000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every method's accuracy with a CI, and every contrast whose two methods are present, Holm-corrected.

    Returns ``{"methods": {name: Estimate dict}, "contrasts": [Contrast dict], "skipped": [names], ...}``.
    """
    methods = {name: estimate(o, level=level, n_boot=n_boot, seed=seed) for name, o in outcomes.items()}
    present = [(a, b) for a, b in contrasts if a in outcomes and b in outcomes]
    skipped = [f"{a} − {b}" for a, b in contrasts if (a, b) not in present]
    raw: dict[str, tuple[Estimate, float]] = {}
    for k, (a, b) in enumerate(present):
        diffs = paired_differences(outcomes[a], outcomes[b])
        boot = hierarchical_bootstrap(diffs, n_boot=n_boot, seed=seed + 1 + k)
        est = estimate(diffs, level=level, n_boot=n_boot, seed=seed + 1 + k)
        raw[f"{a} − {b}"] = (est, bootstrap_p_value(boot, est.mean))
    adjusted = holm({name: p for name, (_, p) in raw.items()})
    family = max(len(present), 1)
    out = []
    for a, b in present:
        est, p = raw[f"{a} − {b}"]
        significant = adjusted[f"{a} − {b}"] < alpha
        verdict = "undecided" if not significant else ("holds" if est.mean > 0 else "reversed")
        out.append(Contrast(a, b, est, p, adjusted[f"{a} − {b}"],
                            smallest_detectable_difference(est.se, alpha=alpha, power=power),
                            smallest_detectable_difference(est.se, alpha=alpha / family, power=power), verdict))  # fmt: skip
    return {
        "methods": {name: e.as_dict() for name, e in methods.items()},
        "contrasts": [c.as_dict() for c in out],
        "skipped": skipped,
        "alpha": alpha,
        "power": power,
        "level": level,
        "n_boot": n_boot,
    }


def adjusted_rand_index(labels_true: Sequence[Any], labels_pred: Sequence[Any]) -> float:
    """Hubert & Arabie's adjusted Rand index of two partitions of the same items (1: identical, ~0: chance).

    Used to say how far a topology's clusters follow the peers' tasks (``labels_true``: each peer's task,
    ``labels_pred``: its cluster). When both partitions are trivial (one block, or all singletons, alike) the index
    is undefined by the formula and taken as 1.0 if they are identical, else 0.0.
    """
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"got {len(labels_true)} true labels for {len(labels_pred)} predicted ones")
    _, a = np.unique(np.asarray(labels_true, dtype=object).astype(str), return_inverse=True)
    _, b = np.unique(np.asarray(labels_pred, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((a.max(initial=-1) + 1, b.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    n = len(a)
    total = n * (n - 1) / 2
    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0 if (rows == cols == index) else 0.0
    return (index - expected) / (maximum - expected)


def wilson_interval(successes: float, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``successes / n`` (one model's accuracy on ``n`` questions).

    Unlike a percentile bootstrap over the questions, it is not degenerate when every answer was right or wrong (a
    held-out share of a few questions, all wrong, gives [0, 0.66] for n = 2, not [0, 0]) and its coverage is close
    to ``level`` down to a handful of questions (Brown, Cai & DasGupta 2001)."""
    if n < 1:
        raise ValueError(f"need at least one question, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))
