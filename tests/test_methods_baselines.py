"""Fair baselines: dense LoRA with a shared A initialisation (lora-shared-a) next to the paper's lora; LoRI whose
peers keep what their neighbours contribute; oracle with two peers per task; the curve over every member."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sorlora.methods.specs import METHOD_SPECS
from sorlora.runtime.model_loading import tiny_random_model
from sorlora.runtime.workspace import Workspace
from sorlora.simulation.runner import run_experiment
from sorlora.simulation.setup import terms_for

from .test_simulation_runner import TINY


def _initial_a(method: str) -> list[dict[str, torch.Tensor]]:
    base, _ = tiny_random_model(seed=0)
    spec = METHOD_SPECS[method]
    terms = terms_for(TINY, method, base_model="tiny-random-llama", fingerprint="0" * 16)
    ws = Workspace(base, "tiny-random-llama", terms, spec.kind)
    for index in range(2):
        ws.add_adapter(f"peer{index:02d}", index)
    out = []
    for index in range(2):
        name = f"peer{index:02d}"
        out.append({k: v.detach().clone() for k, v in ws.model.named_parameters() if f"lora_A.{name}." in k})
    return out


def test_lora_shared_a_starts_every_peer_from_one_a_and_lora_does_not():
    shared = _initial_a("lora-shared-a")
    plain = _initial_a("lora")
    assert shared[0] and len(shared[0]) == len(shared[1])
    for (k0, a0), (_, a1) in zip(sorted(shared[0].items()), sorted(shared[1].items())):
        assert torch.equal(a0, a1), k0
    assert any(not torch.equal(a0, a1) for a0, a1 in zip(plain[0].values(), plain[1].values()))
    assert torch.equal(next(iter(plain[0].values())), next(iter(shared[0].values()))), "peer 0 draws the same A"


def test_lora_shared_a_runs_and_is_scored_per_question(tmp_path):
    summary = run_experiment(TINY.replace(methods=("lora-shared-a",), rounds=1), tmp_path, progress=False)
    result = summary["methods"]["lora-shared-a"]
    assert set(result["accuracy"]) == set(TINY.tasks) and result["bytes_transmitted"] > 0
    for task in TINY.tasks:
        assert len(result["per_question"][task]["correct"]) == TINY.n_test


# ---------------------------------------------------------------- lori: what neighbours contribute reaches the peer


def _dense_b(part, layer):
    b = torch.zeros(part.masks[layer].shape, dtype=torch.float32)
    b[part.masks[layer]] = part.values[layer].float()
    return b


def _round_update(hub, peer, round):
    from peft_sorlora import SparseUpdate
    from sorlora_gossip.layout import UPDATE_FILE, round_tag

    repo = hub.repo_id(peer)
    data = hub.read_bytes(repo, UPDATE_FILE, revision=hub.resolve(repo, round_tag(round)))
    return SparseUpdate.from_bytes(data)


def _delta(view, method):
    """Per layer, the summed delta weight of every adapter of ``view`` (the peer's effective adapter)."""
    base, _ = tiny_random_model(seed=0)
    spec = METHOD_SPECS[method]
    terms = terms_for(TINY, method, base_model="tiny-random-llama", fingerprint="0" * 16)
    ws = Workspace(base, "tiny-random-llama", terms, spec.kind)
    ws.load_view(view)
    from peft_sorlora.layer import SOLoRALayer

    out = {}
    for module in ws.model.modules():
        if isinstance(module, SOLoRALayer):
            out[module.layer_key] = sum(module.get_delta_weight(name) for name in view)
    return out, ws


SCORED: list[tuple[str, tuple[str, ...], dict[str, int]]] = []  # (method, view's adapters, questions per task)


@pytest.fixture(scope="module")
def lori_and_local(tmp_path_factory):
    """lori and local, one round, every scored view recorded (a spy around the real scoring)."""
    from sorlora.evaluation.final_models import Published

    run_dir = tmp_path_factory.mktemp("lori")
    real = Published.score_view

    def spy(self, view, tasks):
        SCORED.append((self.ws.terms.method, tuple(sorted(view)), {t: len(task.test) for t, task in tasks.items()}))
        return real(self, view, tasks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Published, "score_view", spy)
        # the plain average (mean): this checks the forward rule's arithmetic; tests/test_protocol_robust.py the
        # robust default
        summary = run_experiment(TINY.replace(methods=("lori", "local"), rounds=1, aggregation="mean"), run_dir,
                                 progress=False)  # fmt: skip
    return run_dir, summary


def test_a_lori_peer_holds_the_average_on_the_union_of_its_neighbourhood_masks(lori_and_local):
    from sorlora.protocol.state import load_view
    from sorlora.simulation.setup import open_run_hub
    from sorlora_gossip.aggregation import masked_average_updates

    run_dir, summary = lori_and_local
    hub, _ = open_run_hub(TINY.replace(aggregation="mean"), run_dir)
    plan = json.loads(hub.read_bytes(hub.repo_id(f"{TINY.hub_namespace}/collab-lori"), "plan.json", revision="main"))
    me = plan["members"][0]
    neighbours = plan["neighbours"][me]
    assert neighbours, "the random topology gives peer 0 neighbours"
    view = load_view(run_dir / "methods/lori/peers/peer00/view-0000.safetensors", METHOD_SPECS["lori"].kind.payload_cls)
    index = {p: i for i, p in enumerate(plan["members"])}
    assert set(view) == {f"peer{index[p]:02d}" for p in [me, *neighbours]}
    group = sorted([me, *neighbours], key=index.get)
    pushed = {p: _round_update(hub, p, 0) for p in group}
    weights = [float(plan["weights"][p]) for p in group]
    b_bar = masked_average_updates([pushed[p] for p in group], weights)
    layers = sorted(pushed[me].masks)
    reached = 0
    for layer in layers:
        union = torch.zeros_like(pushed[me].masks[layer])
        for p in group:
            union |= pushed[p].masks[layer]
        effective = sum(_dense_b(part, layer) for part in view.values())
        # the view's B (all parts summed: one shared A) is the average on the union, each entry once
        torch.testing.assert_close(effective, torch.where(union, b_bar[layer], torch.zeros(())).float())
        # entries only a neighbour holds carry that neighbour's own trained value, exactly
        for q in neighbours:
            only_q = pushed[q].masks[layer] & ~pushed[me].masks[layer]
            for other in neighbours:
                if other != q:
                    only_q &= ~pushed[other].masks[layer]
            torch.testing.assert_close(effective[only_q], _dense_b(pushed[q], layer)[only_q])
            reached += int((effective[only_q] != 0).sum())
    assert reached > 0, "neighbours' entries outside the own mask reach the peer"

    # ... and they reach its effective weights (the shared A makes the parts' deltas add up to the union's)
    deltas, ws = _delta(view, "lori")
    own_deltas, _ = _delta({f"peer{index[me]:02d}": view[f"peer{index[me]:02d}"]}, "lori")
    changed = [k for k in deltas if not torch.allclose(deltas[k], own_deltas[k])]
    assert set(changed) == set(deltas), "every adapted layer gets neighbours' entries"
    # one A for every part: the summed delta is (sum of parts' B) A
    from peft_sorlora.layer import SOLoRALayer

    layer = next(m for m in ws.model.modules() if isinstance(m, SOLoRALayer))
    name = sorted(view)[0]
    a = layer.solora_A[name]
    for other in view:
        assert torch.equal(layer.solora_A[other], a), "lori's A is shared by every peer"
    effective = sum(_dense_b(part, layer.layer_key) for part in view.values())
    torch.testing.assert_close(deltas[layer.layer_key], (effective @ a.float()) * layer.scaling[name])


def test_lori_still_sends_only_its_own_mask_and_differs_from_local(lori_and_local):
    run_dir, summary = lori_and_local
    lori, local = summary["methods"]["lori"], summary["methods"]["local"]
    from sorlora.simulation.setup import open_run_hub

    hub, _ = open_run_hub(TINY.replace(aggregation="mean"), run_dir)
    own = _round_update(hub, f"{TINY.hub_namespace}/lori-peer00", 0)
    # bytes: every link carries one peer's own masked values (round 0: plus its structure), never the union
    assert lori["params_transmitted_per_round"] == pytest.approx(sum(int(m.sum()) for m in own.masks.values()))
    assert lori["bytes_transmitted"] > 0 and local["bytes_transmitted"] == 0
    assert lori["refused"] == {}
    from sorlora.protocol.state import load_view

    cls = METHOD_SPECS["lori"].kind.payload_cls
    local_view = load_view(run_dir / "methods/local/peers/peer00/view-0000.safetensors", cls)
    lori_view = load_view(run_dir / "methods/lori/peers/peer00/view-0000.safetensors", cls)
    assert list(local_view) == ["peer00"] and len(lori_view) > 1
    local_delta, _ = _delta(local_view, "local")
    lori_delta, _ = _delta(lori_view, "lori")
    assert any(not torch.allclose(local_delta[k], lori_delta[k]) for k in local_delta)


def test_the_evaluator_scores_the_published_neighbourhood_and_refuses_bad_parts(lori_and_local):
    from sorlora.evaluation.final_models import Neighbourhood, Published
    from sorlora.protocol.state import load_view
    from sorlora.simulation.setup import open_run_hub
    from sorlora_gossip.layout import NEIGHBOURHOOD_DIR

    run_dir, _ = lori_and_local
    hub, _ = open_run_hub(TINY.replace(aggregation="mean"), run_dir)
    plan = json.loads(hub.read_bytes(hub.repo_id(f"{TINY.hub_namespace}/collab-lori"), "plan.json", revision="main"))
    cls = METHOD_SPECS["lori"].kind.payload_cls
    parts = {p: cls.from_bytes(hub.read_bytes(hub.repo_id(p), "expert.safetensors", revision="final"))
             for p in plan["members"]}  # fmt: skip
    pub = Published(plan=plan, tasks_of={}, parts=parts, ws=None, tokenizer=None, hub=hub, eval_kw={}, rank=4)
    me = plan["members"][0]
    view, refused = Neighbourhood.peer_view(pub, me)
    local = load_view(run_dir / "methods/lori/peers/peer00/view-0000.safetensors", cls)
    assert refused == {} and set(view) == set(local)
    for name in view:
        for layer in view[name].values:
            assert torch.equal(view[name].values[layer], local[name].values[layer])

    class Garbled:  # the hub, with one neighbour part replaced by bytes that are not a payload
        def __getattr__(self, attr):
            return getattr(hub, attr)

        def read_bytes(self, repo_id, path, **kw):
            return b"not a payload" if path.startswith(NEIGHBOURHOOD_DIR) else hub.read_bytes(repo_id, path, **kw)

    bad = Published(plan=plan, tasks_of={}, parts=parts, ws=None, tokenizer=None, hub=Garbled(), eval_kw={}, rank=4)
    view, refused = Neighbourhood.peer_view(bad, me)
    assert set(refused) == set(plan["neighbours"][me]) and list(view) == ["peer00"]
    assert all("neighbourhood/peer" in why and "@" in why for why in refused.values())
    # a part whose masks are not its neighbour's own is refused too
    q = plan["neighbours"][me][0]
    flipped = dict(parts)
    flipped[q] = dataclasses.replace(parts[q], masks={k: ~m for k, m in parts[q].masks.items()})
    wrong = Published(plan=plan, tasks_of={}, parts=flipped, ws=None, tokenizer=None, hub=hub, eval_kw={}, rank=4)
    _, refused = Neighbourhood.peer_view(wrong, me)
    assert list(refused) == [q] and "masks" in refused[q]


def test_member_views_exclusive_counts_each_entry_once():
    from peft_sorlora import SparseUpdate
    from sorlora_gossip.aggregation import masked_average, member_views

    torch.manual_seed(0)
    masks = [{"l": torch.rand(6, 3) < 0.5} for _ in range(3)]
    values = [{"l": torch.randn(int(m["l"].sum()))} for m in masks]
    updates = [SparseUpdate(values=v, masks=m, shapes={"l": (6, 3, 5)}, metadata={"round": "0"})
               for v, m in zip(values, masks)]  # fmt: skip
    b_bar = masked_average(values, masks)["l"]
    union = masks[0]["l"] | masks[1]["l"] | masks[2]["l"]
    exclusive = member_views({"l": b_bar}, updates, exclusive=True)
    total = sum(_dense_b(p, "l") for p in exclusive)
    torch.testing.assert_close(total, torch.where(union, b_bar, torch.zeros(())))
    shared = member_views({"l": b_bar}, updates)  # every holder carries a collided entry (per-member A)
    collided = (masks[0]["l"].int() + masks[1]["l"].int() + masks[2]["l"].int()) > 1
    assert collided.any() and not torch.allclose(sum(_dense_b(p, "l") for p in shared)[collided], total[collided])
    torch.testing.assert_close(_dense_b(exclusive[0], "l"), _dense_b(shared[0], "l"))  # the first keeps all its own


def test_the_curve_scores_every_members_view_at_a_bounded_cost(lori_and_local):
    from sorlora.protocol.state import load_view

    run_dir, summary = lori_and_local
    cls = METHOD_SPECS["lori"].kind.payload_cls
    views = {tuple(sorted(load_view(run_dir / f"methods/lori/peers/peer{m:02d}/view-0000.safetensors", cls)))
             for m in range(TINY.peers)}  # fmt: skip
    assert len(views) == TINY.peers  # a 4-cycle: every member holds a different neighbourhood
    curve_calls = [c for c in SCORED if c[0] == "lori"][: TINY.peers]  # the curve runs before the final evaluation
    assert {c[1] for c in curve_calls} == views
    # n_curve = 3 questions per task dealt to 4 members: each scores one, so 4 per task and round (max(n_curve, P))
    assert all(c[2] == {t: 1 for t in TINY.tasks} for c in curve_calls)
    assert len(summary["methods"]["lori"]["curve"]) == 1
    assert set(summary["methods"]["lori"]["curve"][0]) == set(TINY.tasks)


def test_oracle_with_two_peers_per_task_aggregates_inside_each_task(tmp_path):
    from sorlora.evaluation.report import results_table
    from sorlora.protocol.state import load_view

    cfg = TINY.replace(methods=("oracle",), rounds=1)  # 4 peers, 2 tasks: two peers per task
    summary = run_experiment(cfg, tmp_path, progress=False)
    oracle = summary["methods"]["oracle"]
    by_task = {}
    for p in range(cfg.peers):
        by_task.setdefault(cfg.task_of(p), []).append(p)
    assert sorted(map(sorted, oracle["clusters"])) == sorted(map(sorted, by_task.values()))
    assert oracle["bytes_transmitted"] > 0, "per-task clusters exchange"
    cls = METHOD_SPECS["oracle"].kind.payload_cls
    view = load_view(tmp_path / "methods/oracle/peers/peer00/view-0000.safetensors", cls)
    mate = next(p for p in by_task[cfg.task_of(0)] if p != 0)
    assert set(view) == {"peer00", f"peer{mate:02d}"}
    assert any(v.abs().sum() > 0 for v in view[f"peer{mate:02d}"].values.values())
    assert "not an upper bound" not in results_table(summary)
    one_each = json.loads(json.dumps(summary))
    one_each["methods"]["oracle"]["clusters"] = [[0], [1]]
    one_each["config"]["peers"] = 2
    assert "one peer per task" in results_table(one_each) and "not an upper bound" in results_table(one_each)
