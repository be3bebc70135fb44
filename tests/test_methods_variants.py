"""The implicit-MoE diagnostics' variants: ``solora-union`` (a single cluster whose forward is every member's own
part, never averaged at a collision), ``solora-cotrain`` (clusters exchange experts every few rounds and train
alongside the others' frozen experts) and the clusters-against-tasks adjusted Rand index of every cluster method."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sorlora.methods.specs import METHOD_SPECS
from sorlora.protocol.state import load_view
from sorlora.runtime.workspace import Workspace
from sorlora.simulation.runner import run_experiment
from sorlora.simulation.setup import open_run_hub

from .test_simulation_runner import TINY

TRAINED: list[tuple[str, str, tuple[str, ...]]] = []  # (method, trained adapter, active adapters) per train call
# the plain average (mean): these tests check each rule's arithmetic exactly; tests/test_protocol_robust.py the
# robust default
COTRAIN = TINY.replace(methods=("solora-union", "solora-single", "solora-cotrain"), rounds=3, s_max=0.2,
                       aggregation="mean")  # fmt: skip


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("variants")
    real = Workspace.train

    def spy(self, name, active, batches, *, lr):
        TRAINED.append((self.terms.method, name, tuple(sorted(active))))
        return real(self, name, active, batches, lr=lr)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Workspace, "train", spy)
        summary = run_experiment(COTRAIN, run_dir, progress=False)
    return run_dir, summary


def _pushed(hub, peer, round):
    from peft_sorlora import SparseUpdate
    from sorlora_gossip.layout import UPDATE_FILE, round_tag

    repo = hub.repo_id(peer)
    return SparseUpdate.from_bytes(hub.read_bytes(repo, UPDATE_FILE, revision=hub.resolve(repo, round_tag(round))))


def _round0_views(run_dir, method):
    cls = METHOD_SPECS[method].kind.payload_cls
    return load_view(run_dir / f"methods/{method}/peers/peer00/view-0000.safetensors", cls)


def test_union_keeps_every_members_own_values_where_single_averages_collisions(variants):
    run_dir, summary = variants
    hub, _ = open_run_hub(COTRAIN, run_dir)
    union, single = _round0_views(run_dir, "solora-union"), _round0_views(run_dir, "solora-single")
    assert sorted(union) == [f"peer{i:02d}" for i in range(COTRAIN.peers)], "one cluster: every member in the view"
    collided = 0
    for method, view in (("solora-union", union), ("solora-single", single)):
        pushed = {i: _pushed(hub, f"{COTRAIN.hub_namespace}/{method}-peer{i:02d}", 0) for i in range(COTRAIN.peers)}
        for i, part in enumerate(view[f"peer{j:02d}"] for j in range(COTRAIN.peers)):
            for layer, mask in part.masks.items():
                assert torch.equal(mask, pushed[i].masks[layer])
                others = torch.zeros_like(mask)
                for j in pushed:
                    if j != i:
                        others |= pushed[j].masks[layer]
                shared = others[mask]  # this member's entries that another member's mask also holds
                same = part.values[layer] == pushed[i].values[layer]
                if method == "solora-union":
                    assert bool(same.all()), "union: a member's part is exactly what it sent, collisions included"
                else:
                    assert bool(same[~shared].all()), "single: entries only one member holds are its own values"
                    collided += int((~same[shared]).sum())
    assert collided > 0, "solora-single averages at collisions (else the two variants are the same training)"
    u, s = summary["methods"]["solora-union"], summary["methods"]["solora-single"]
    assert u["bytes_transmitted"] == s["bytes_transmitted"] > 0, "the same payloads travel: only the view differs"
    assert u["accuracy"].keys() == set(COTRAIN.tasks) and len(u["per_question"][COTRAIN.tasks[0]]["correct"]) > 0


def test_cotrain_exchanges_every_two_rounds_and_trains_alongside_the_other_clusters(variants):
    run_dir, summary = variants
    result = summary["methods"]["solora-cotrain"]
    clusters = result["clusters"]
    assert len(clusters) >= 2, f"the test needs several clusters, got {clusters}"
    state = json.loads((run_dir / "methods/solora-cotrain/peers/peer00/state.json").read_text())
    assert [e["round"] for e in state["exchanges"]] == [1, 2], "cotrain_every=2: after round 1 and the last"
    mine = next(c for c in clusters if 0 in c)
    own_cluster = {f"peer{q:02d}" for q in mine}
    calls = [active for method, name, active in TRAINED if method == "solora-cotrain" and name == "peer00"]
    assert len(calls) == COTRAIN.rounds
    for r, active in enumerate(calls):
        outside = set(active) - own_cluster
        if r < 2:
            assert not outside, f"round {r}: no experts exchanged yet, the forward is the own cluster"
        else:
            assert outside == {f"peer{q:02d}" for c in clusters if 0 not in c for q in c}, (
                "after the exchange every other cluster's expert is in the forward"
            )
    # the exchange's bytes are counted: two exchanges pull more than solora's one would
    assert result["inter_cluster_bytes"] > 0
    per_round = [sum(e["bytes_pulled"] for e in json.loads((p / "state.json").read_text())["exchanges"]
                     if e["round"] == 1) for p in (run_dir / "methods/solora-cotrain/peers").iterdir()]  # fmt: skip
    assert sum(per_round) > 0 and result["bytes_by_round"][1] >= sum(per_round)
    # the other clusters' experts stayed frozen: what peer00 pushed in round 2 is only its own mask's values
    hub, _ = open_run_hub(COTRAIN, run_dir)
    r1, r2 = (_pushed(hub, f"{COTRAIN.hub_namespace}/solora-cotrain-peer00", r) for r in (1, 2))
    assert set(r2.values) == set(r1.values) and any(not torch.equal(r1.values[k], r2.values[k]) for k in r1.values)
    assert result["routing"] is not None and result["cluster_task_ari"] is not None


def test_a_restarted_cotrain_peer_trains_alongside_the_experts_it_had(variants, tmp_path):
    """Resume: a peer killed before round 2 reloads the round-1 exchange's experts from its state directory."""
    from sorlora.data.registry import load_task
    from sorlora.runtime.model_loading import tiny_random_model
    from sorlora.simulation.engines.base import PeerLaunch
    from sorlora.simulation.engines.local import InProcessEngine

    run_dir, _ = variants
    src = run_dir / "methods/solora-cotrain/peers/peer00"
    state_dir = tmp_path / "peer00"
    shutil.copytree(src, state_dir)
    state = json.loads((state_dir / "state.json").read_text())
    state.update(phase="train", round=2)
    state["records"] = [rec for rec in state["records"] if rec["round"] < 2]
    state["exchanges"] = [e for e in state["exchanges"] if e["round"] < 2]
    (state_dir / "state.json").write_text(json.dumps(state))
    hub, _ = open_run_hub(COTRAIN, run_dir)
    base, tokenizer = tiny_random_model(seed=0)
    engine = InProcessEngine(base=base, tokenizer=tokenizer, progress=False)
    train = load_task(COTRAIN.tasks[0], n_train=COTRAIN.n_train, n_test=COTRAIN.n_test).train
    launch = PeerLaunch(peer_id=f"{COTRAIN.hub_namespace}/solora-cotrain-peer00", task=COTRAIN.tasks[0], train=train,
                        state_dir=state_dir, position_mm=(0, 0))  # fmt: skip
    (program,) = engine.programs(hub, f"{COTRAIN.hub_namespace}/collab-solora-cotrain", [launch])
    program._prepare()
    saved = load_view(src / "experts-0001.safetensors", METHOD_SPECS["solora-cotrain"].kind.payload_cls)
    held = {f"peer{q:02d}": part for e in program.experts.values() for q, part in e.items()}
    assert held and sorted(held) == sorted(saved)
    for name, part in held.items():
        for layer, values in part.values.items():
            assert torch.equal(values, saved[name].values[layer])


def test_every_cluster_method_reports_its_clusters_against_the_tasks(variants):
    from sorlora.evaluation.stats import adjusted_rand_index

    run_dir, summary = variants
    for method in ("solora-union", "solora-single", "solora-cotrain"):
        res = summary["methods"][method]
        tasks = [COTRAIN.task_of(p) for p in range(COTRAIN.peers)]
        labels = [next(i for i, c in enumerate(res["clusters"]) if p in c) for p in range(COTRAIN.peers)]
        assert res["cluster_task_ari"] == pytest.approx(adjusted_rand_index(tasks, labels))
    assert summary["methods"]["solora-single"]["cluster_task_ari"] == 0.0, "one cluster for two tasks: chance"
    assert "adjusted Rand index" in (run_dir / "results.md").read_text()


def test_adjusted_rand_index_on_known_partitions():
    from sorlora.evaluation.stats import adjusted_rand_index

    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0, "the labels' names do not matter"
    assert adjusted_rand_index(["a", "a", "b", "b"], [0, 0, 1, 2]) == pytest.approx(4 / 7)  # Hubert & Arabie
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(8 / 33)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 0]) == 0.0, "one block against two: no agreement"
    with pytest.raises(ValueError, match="3 true labels for 2"):
        adjusted_rand_index([0, 1, 2], [0, 1])


def test_dealt_scoring_answers_each_question_once_by_the_member_it_was_dealt_to(tmp_path):
    """score_members="dealt": question i of a task goes to member i mod P; its outcome is that member's answer."""
    from sorlora.evaluation.final_models import Published

    calls = []
    real = Published.score_view

    def spy(self, view, tasks):
        out = real(self, view, tasks)
        calls.append((sorted(view), {t: [e.prompt for e in task.test] for t, task in tasks.items()}, out))
        return out

    cfg = TINY.replace(methods=("lora",), rounds=1, n_test=9, score_members="dealt", n_curve=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Published, "score_view", spy)
        summary = run_experiment(cfg, tmp_path, progress=False)
    finals = [c for c in calls if sum(len(p) for p in c[1].values()) > len(cfg.tasks)]  # not the 1-question curve
    assert [c[0] for c in finals] == [[f"peer{m:02d}"] for m in range(cfg.peers)], "each member scores its own model"
    result = summary["methods"]["lora"]
    from sorlora.simulation.setup import load_tasks

    tasks = load_tasks(cfg)
    for t, task in tasks.items():
        prompts = [e.prompt for e in task.test]
        dealt = [c[1].get(t, []) for c in finals]
        assert sorted(p for d in dealt for p in d) == sorted(prompts), "every question answered exactly once"
        for i, prompt in enumerate(prompts):
            m = i % cfg.peers
            assert dealt[m][i // cfg.peers] == prompt
            assert result["per_question"][t]["correct"][i] == finals[m][2][t]["correct"][i // cfg.peers]
        scored = [c for c in result["per_question"][t]["correct"] if c is not None]
        assert result["accuracy"][t] == pytest.approx(sum(scored) / len(scored))
