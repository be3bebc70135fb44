"""Clusters that follow the tasks without tuning (issue 21): at default terms (``s_max=None``, automatic) the cluster
topology puts the peers of one task together and keeps unrelated tasks apart, on registrations made by real peer
programs from their own task files, and every member computes the same plan; the automatic cut on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_router.centroids import PROTOCOL_POOL
from peft_sorlora.base_model import base_fingerprint
from sorlora.cli.collab import load_peer_data
from sorlora.evaluation.stats import adjusted_rand_index
from sorlora.protocol.collab import Collaboration, create_collaboration
from sorlora.protocol.plan import compute_plan
from sorlora.protocol.program import PeerProgram
from sorlora.protocol.publish import read_prompt_mean
from sorlora.protocol.terms import CollabTerms, TermsError
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.local import InProcessEngine
from sorlora_gossip import LocalHub
from sorlora_gossip.topology import (
    SAME_TASK_DISTANCE,
    SAME_TASK_RATIO,
    auto_cut,
    budget_distances,
    cluster_collision_rate,
    cluster_topology,
    clusters,
    signature_distances,
    silhouette,
    statistics_distances,
    task_cut,
)


def _ari(plan: dict, task_of: dict[str, str]) -> float:
    members = [p for c in plan["clusters"] for p in c]
    return adjusted_rand_index([task_of[p] for p in members], [k for k, c in enumerate(plan["clusters"]) for _ in c])


def _task_file(path, task: str, half: int):
    """One half of a file task: sums (multiple choice) or film reviews (text, label), as a user would bring them."""
    if task == "sums":
        rows = [{"prompt": f"What is {i} + {i % 7}?", "options": [str(i + i % 7), str(i + i % 7 + 1)],
                 "answer": str(i + i % 7)} for i in range(half, 96, 2)]  # fmt: skip
    else:
        words = ["great", "awful", "fine", "dull", "lovely", "boring", "superb", "weak"]
        rows = [{"text": f"the film was {words[i % 8]} and {words[i * 3 % 8]}", "label": "pos" if i // 2 % 2 else "neg"}
                for i in range(half, 96, 2)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_four_peers_two_file_tasks_default_terms_clusters_follow_the_tasks(tmp_path):
    base, tokenizer, _ = load_base(TINY_BASE_ID)
    terms = CollabTerms(base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(base), publish_base=True)
    assert terms.s_max is None and terms.spec.topology == "cluster", "the default terms cluster automatically"
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", terms)
    engine = InProcessEngine(base=base, tokenizer=tokenizer, progress=False)
    task_of, programs = {}, []
    try:
        for i, (user, task) in enumerate(zip(["ann", "ben", "cat", "dan"], ["sums", "reviews"] * 2)):
            path = _task_file(tmp_path / "data" / f"{user}.jsonl", task, i // 2)  # the peer's own file, its own half
            data = load_peer_data(str(path), None)  # as `sorlora peer --data FILE`: the task is the file's stem
            assert data.task == user
            programs.append(PeerProgram(hub=hub, collab_id="lab/c", peer_id=f"{user}/dev", state_dir=tmp_path / user,
                                        workspace=engine.workspace, data=data))  # fmt: skip
            task_of[f"{user}/dev"] = task
        for p in programs:
            p.step()  # registers: its layer budget from its own calibration batch
        for p in programs:
            p.step()  # the first commits the plan, every other recomputes it and checks it is the same
            assert p.phase == "calibrate", p.phase
    finally:
        engine.release()
    collab = Collaboration(hub, "lab/c")
    plan = collab.read_plan()
    closing = collab.closing()
    stats = {r.peer: collab.member_stats(r.peer, revision=closing.commit) for r in closing.registrations}
    pool, width = PROTOCOL_POOL, base.get_input_embeddings().embedding_dim
    signatures = {r.peer: (*read_prompt_mean(hub, "lab/c", r.peer, revision=closing.commit, pool_layer=pool,
                                             width=width), 0.0) for r in closing.registrations}  # fmt: skip
    assert plan == compute_plan(collab.terms(), closing.registrations, collab_commit=closing.commit, statistics=stats,
                                signatures=signatures)  # fmt: skip
    assert plan["clusters_by"]["basis"] == "signatures", "the registered prompt means measure the tasks"
    assert all(p.plan == plan for p in programs), "every member holds the same plan"
    by_statistics = compute_plan(collab.terms(), closing.registrations, collab_commit=closing.commit, statistics=stats)
    assert by_statistics["clusters_by"]["basis"] == "statistics" and _ari(by_statistics, task_of) >= 0.9
    budgets_only = compute_plan(collab.terms(), closing.registrations, collab_commit=closing.commit)
    assert _ari(budgets_only, task_of) >= 0.9, "the layer budgets alone (methods without task statistics) too"
    assert _ari(plan, task_of) >= 0.9, plan["clusters"]
    assert sorted(plan["clusters"]) == [["ann/dev", "cat/dev"], ["ben/dev", "dan/dev"]]


def _budgets(tasks: list[int], *, layers: int = 6, noise: float = 0.004, seed: int = 0) -> np.ndarray:
    """Layer budgets (kept fractions) of peers: each task its own profile over layers, each peer sampling noise."""
    rng = np.random.default_rng(seed)
    profiles = 0.25 + 0.08 * rng.standard_normal((max(tasks) + 1, layers))
    return np.clip(profiles[tasks] + noise * rng.standard_normal((len(tasks), layers)), 0.01, 0.99)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tasks", [[0, 1, 0, 1], [0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2, 0, 1]])
def test_automatic_clusters_recover_the_tasks_and_meet_their_bound(tasks, seed):
    s = _budgets(tasks, seed=seed)
    pos = np.random.default_rng(seed).uniform(-30, 30, size=(len(tasks), 2))
    g = cluster_topology(pos, s, s_max=None, payload_bits=1e5, seed=seed)
    found = [next(c for c, m in enumerate(clusters(g)) if v in m) for v in range(len(tasks))]
    assert adjusted_rand_index(tasks, found) == pytest.approx(1.0), (tasks, found)
    assert g.graph["auto"] and all(rate <= g.graph["s_max"] + 1e-12 for rate in g.graph["collision_rate"].values())
    again = cluster_topology(pos, s, s_max=None, payload_bits=1e5, seed=seed)
    assert [g.nodes[v]["cluster"] for v in g] == [again.nodes[v]["cluster"] for v in again], "deterministic"


def _statistics(tasks: list[int], *, seed: int, layers: int = 5, width: int = 32) -> list[dict[str, np.ndarray]]:
    """Mean layer inputs of peers on 4 tasks at two scales, as on SmolLM2: tasks 0 and 1 near each other (two review
    tasks), 2 and 3 too (two word tasks), and each peer's own sampling noise, smaller than any task difference."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((layers, width)) * 4
    family = [shared + rng.standard_normal((layers, width)) * 1.0 for _ in range(2)]
    task = [family[t // 2] + rng.standard_normal((layers, width)) * 0.5 for t in range(4)]
    return [{f"layer{k}": (task[t] + rng.standard_normal((layers, width)) * 0.12)[k] for k in range(layers)}
            for t in tasks]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_task_statistics_find_tasks_the_budgets_cannot_tell_apart(seed):
    tasks = [0, 1, 2, 3, 0, 1, 2, 3]  # the study preset: 8 peers, 2 per task, peer i on task i % 4
    stats = _statistics(tasks, seed=seed)
    d = statistics_distances(stats)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0) and d.max() < 1
    s = np.full((8, 4), 0.25)  # equal budgets: nothing to tell the tasks apart by
    pos = np.random.default_rng(seed).uniform(-30, 30, size=(8, 2))
    g = cluster_topology(pos, s, s_max=None, payload_bits=1e5, seed=seed, task_statistics=stats)
    found = [next(c for c, m in enumerate(clusters(g)) if v in m) for v in range(8)]
    assert adjusted_rand_index(tasks, found) == pytest.approx(1.0), found
    assert len(clusters(cluster_topology(pos, s, s_max=None, payload_bits=1e5, seed=seed))) in (1, 8)


def test_statistics_without_structure_leave_the_clusters_to_the_budgets():
    tasks = [0, 1, 0, 1]
    rng = np.random.default_rng(0)
    noise = [{f"layer{k}": rng.standard_normal(64) for k in range(3)} for _ in tasks]  # e.g. drowned in DP noise
    assert task_cut(statistics_distances(noise)) is None
    pos = np.arange(8.0).reshape(4, 2)
    g = cluster_topology(pos, _budgets(tasks, seed=4), s_max=None, payload_bits=1e4, task_statistics=noise)
    assert adjusted_rand_index(tasks, [g.nodes[v]["cluster"] for v in range(4)]) == pytest.approx(1.0)


def test_one_task_is_one_cluster_and_unrelated_peers_stay_apart():
    pos = np.zeros((4, 2)) + np.arange(4)[:, None]
    one_task = _budgets([0, 0, 0, 0], seed=3)
    assert len(clusters(cluster_topology(pos, one_task, s_max=None, payload_bits=1e4))) == 1
    unrelated = _budgets([0, 1, 2, 3], seed=3, noise=0.0)
    assert budget_distances(unrelated).min(initial=1, where=~np.eye(4, dtype=bool)) > SAME_TASK_DISTANCE
    assert len(clusters(cluster_topology(pos, unrelated, s_max=None, payload_bits=1e4))) == 4


def test_power_still_bounds_automatic_clusters():
    s = _budgets([0, 0, 1, 1], seed=1)
    pos = np.array([[0.0, 0.0], [90.0, 0.0], [0.0, 1.0], [90.0, 1.0]])
    cheap = cluster_topology(pos, s, s_max=None, payload_bits=1e4, seed=2)
    assert sorted(map(sorted, clusters(cheap))) == [[0, 1], [2, 3]]
    costly = cluster_topology(pos, s, s_max=None, payload_bits=3e9, seed=2)
    assert len(clusters(costly)) == 4, "a merge the channel cannot carry is not made, whatever the budgets say"


def test_auto_cut_and_budget_distance():
    assert budget_distances([[0.2, 0.2], [0.2, 0.2]])[0, 1] == 0.0
    assert budget_distances([[0.4, 0.0], [0.0, 0.4]])[0, 1] == pytest.approx(1.0)
    d = np.array([[0, 0.01, 0.5, 0.5], [0.01, 0, 0.5, 0.5], [0.5, 0.5, 0, 0.02], [0.5, 0.5, 0.02, 0]])
    assert auto_cut(d) == pytest.approx(0.02), "cut below the jump from 0.02 to 0.5"
    assert silhouette(d, [[0, 1], [2, 3]]) > 0.9 > 0 == silhouette(d, [[0], [1], [2], [3]])
    assert auto_cut(np.full((3, 3), 0.05) - 0.05 * np.eye(3)) == SAME_TASK_DISTANCE, "no jump: the default cut"
    assert cluster_collision_rate([0.25, 0.25]) < 0.1 < cluster_collision_rate([0.25, 0.25, 0.25])


def test_terms_refuse_a_bad_s_max():
    base, _, _ = load_base(TINY_BASE_ID)
    with pytest.raises(TermsError, match="s_max"):
        CollabTerms(base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(base), s_max=1.5)


def _unit_sample(center: np.ndarray, n: int, rng: np.random.Generator, spread: float = 0.15) -> np.ndarray:
    x = center + spread * rng.standard_normal((n, center.size))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("sigma", [0.0, 0.01])
def test_signature_distance_is_about_one_within_a_distribution_and_large_across(sigma):
    """Two peers' prompt means from one distribution differ by sampling noise only: their distance is about 1
    (its expectation), with or without privacy noise on the means; peers of another distribution are far."""
    rng = np.random.default_rng(0)
    width, n = 64, 64
    a, b = rng.standard_normal(width), rng.standard_normal(width)
    c = a + 0.8 * rng.standard_normal(width)  # a related task (as the two film-review tasks)
    means, within = [], []
    for center in (a, a, b, b, c, c):
        x = _unit_sample(center / np.linalg.norm(center), n, rng)
        means.append(x.mean(0) + sigma * rng.standard_normal(width))
    d = signature_distances(means, [n] * 6, [sigma] * 6)
    within = [d[0, 1], d[2, 3], d[4, 5]]
    assert all(0.2 < w < 3.0 for w in within), within
    assert min(d[0, 2], d[0, 4], d[2, 4]) > 4 * max(within), d
    groups = cluster_topology(np.zeros((6, 2)), np.full(6, 0.25), s_max=None, payload_bits=0,
                              task_signatures=[(mean, n, sigma) for mean in means])  # fmt: skip
    assert groups.graph["distance_basis"] == "signatures"
    assert sorted(sorted(g) for g in clusters(groups)) == [[0, 1], [2, 3], [4, 5]]


def test_signature_distances_refuse_bad_input_and_two_peers_use_the_fixed_cut():
    with pytest.raises(ValueError, match="one entry per peer"):
        signature_distances([np.ones(3)], [4, 4])
    with pytest.raises(ValueError, match="same width"):
        signature_distances([np.ones(3), np.ones(4)], [4, 4])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        signature_distances([np.ones(3), np.ones(3)], [1, 4])
    rng = np.random.default_rng(1)
    a = rng.standard_normal(32)
    one_task = [_unit_sample(a / np.linalg.norm(a), 48, rng).mean(0) for _ in range(2)]
    d = signature_distances(one_task, [48, 48])
    assert task_cut(d) is None and d[0, 1] < SAME_TASK_RATIO, "two peers: no structure to read, the test's cut"
    g = cluster_topology(np.zeros((2, 2)), np.full(2, 0.25), s_max=None, payload_bits=0,
                         task_signatures=[(mean, 48, 0.0) for mean in one_task])  # fmt: skip
    assert g.graph["distance_cut"] == SAME_TASK_RATIO and len(clusters(g)) == 1
