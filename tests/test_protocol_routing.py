"""The sequence router reaches the MoE the peers publish and the simulation scores (issue 21): each member registers
centroids of its training prompts' pooled hidden states, the published MoE carries every cluster's centroids and
the terms' router, it loads with ``AutoModelForCausalLM`` and routes every test prompt to its task's cluster; the
evaluator scores the same weights under every router with routing diagnostics; a bad centroid file leaves out only
its member's centroids."""

from __future__ import annotations

import json
import types

import pytest
import torch

from moe_router.centroids import PROTOCOL_POOL, pool_width
from sorlora.evaluation.final_models import EVAL_ANCHORS, EVAL_ROUTERS, _prompt_batches
from sorlora.evaluation.scoring import option_loglikelihoods
from sorlora.protocol.publish import (
    MAX_CENTROID_BYTES,
    centroid_bytes,
    centroids_path,
    configure_router,
    moe_centroids,
    read_centroids,
)
from sorlora.protocol.terms import CollabTerms, TermsError
from sorlora.simulation.config import ConfigError, ExperimentConfig
from sorlora.simulation.runner import run_experiment
from sorlora.simulation.setup import collab_id

from .test_simulation_runner import TINY

# 2 synthetic tasks x 2 peers; automatic clusters (s_max=None, the default) follow the tasks
ROUTED = TINY.replace(methods=("solora",), n_validation=0, s_max=None)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("routed")
    summary = run_experiment(ROUTED, run_dir, progress=False)
    from sorlora_gossip import LocalHub

    return run_dir, summary, LocalHub(run_dir / "hub", namespace=ROUTED.hub_namespace)


def _plan(hub):
    from sorlora.protocol.collab import Collaboration

    return Collaboration(hub, collab_id(ROUTED, "solora")).read_plan()


def _own_clusters(plan):
    """Task -> the plan's cluster holding its peers (peer i holds tasks[i % 2])."""
    out = {}
    for c, members in enumerate(plan["clusters"]):
        for p in members:
            out.setdefault(ROUTED.tasks[plan["members"].index(p) % len(ROUTED.tasks)], c)
    return out


def _load_published(hub, tmp_path):
    from transformers import AutoModelForCausalLM

    import moe_router  # noqa: F401  (registers the model type)

    # the collaboration's one MoE, as every member's report names it
    repo = json.loads(hub.read_bytes(hub.repo_id("solora-peer01"), "report.json", revision="final"))["moe"]["repo"]
    local = tmp_path / "moe"
    for name in hub.list_files(repo):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(hub.read_bytes(repo, name, revision="main"))
    return AutoModelForCausalLM.from_pretrained(local).eval()


def _tasks():
    from sorlora.simulation.setup import load_model, load_tasks

    _, tokenizer, _ = load_model(ROUTED)
    return load_tasks(ROUTED), tokenizer


def test_members_register_centroids_and_the_published_moe_carries_them(routed, tmp_path):
    _, summary, hub = routed
    plan = _plan(hub)
    assert summary["methods"]["solora"]["cluster_task_ari"] == 1.0, "one cluster per task: the test's premise"
    for peer in plan["members"]:
        user, name = peer.split("/")
        assert centroids_path(user, name) in hub.list_files(collab_id(ROUTED, "solora"), revision=plan["collab_commit"])
    moe = _load_published(hub, tmp_path)
    assert moe.config.router == "sequence" and summary["methods"]["solora"]["published_router"] == "sequence"
    centroids, mask = moe.router.tensors["centroids"], moe.router.tensors["centroid_mask"]
    assert centroids.shape[0] == moe.num_experts == len(plan["clusters"])
    pool = moe.config.router_options["sequence"]["pool_layer"]
    assert pool == PROTOCOL_POOL, "the published MoE records what its members pooled"
    for e, members in enumerate(plan["clusters"]):  # every member's centroids, concatenated in plan order
        want = torch.cat([read_centroids(hub, collab_id(ROUTED, "solora"), p, revision=plan["collab_commit"],
                                         pool_layer=pool, width=centroids.shape[-1]) for p in sorted(
                                             members, key=plan["members"].index)])  # fmt: skip
        assert int(mask[e].sum()) == want.shape[0] and torch.equal(centroids[e, : want.shape[0]], want)


def test_the_loaded_moe_routes_every_test_prompt_to_its_tasks_cluster_as_the_evaluator_did(routed, tmp_path):
    _, summary, hub = routed
    moe = _load_published(hub, tmp_path)
    tasks, tokenizer = _tasks()
    own = _own_clusters(_plan(hub))
    chosen, labels = [], []
    with torch.no_grad():
        for batch, names in _prompt_batches(
            tasks, tokenizer, batch_size=ROUTED.eval_batch_size, max_len=ROUTED.max_len
        ):
            moe(**batch)
            chosen += moe.routing_choices()["sequence"][:, 0].tolist()
            labels += names
    assert chosen == [own[t] for t in labels], "every test prompt routed to its own task's cluster"
    diagnostics = summary["methods"]["solora"]["routing_diagnostics"]["sequence"]
    assert diagnostics["selected"] == chosen, "the same choices as the evaluator's (in memory) model made"


def test_scoring_routes_on_the_prompt_and_keeps_the_choice_for_every_option(routed, tmp_path):
    """Sequence routing with every component kept is hard routing by the predicted cluster: where it predicts right
    (every prompt here), option log-likelihoods equal hard routing by the true task's cluster."""
    _, _, hub = routed
    moe = _load_published(hub, tmp_path)
    tasks, tokenizer = _tasks()
    own = _own_clusters(_plan(hub))
    for name, task in tasks.items():
        with moe.router_settings(router="sequence", top_k=None):
            seq = option_loglikelihoods(moe, tokenizer, task.test, batch_size=4, max_len=ROUTED.max_len)
        with moe.router_settings(router="hard"), moe.routed(own[name]):
            hard = option_loglikelihoods(moe, tokenizer, task.test, batch_size=4, max_len=ROUTED.max_len)
        with moe.router_settings(router="sum"):
            plain = option_loglikelihoods(moe, tokenizer, task.test, batch_size=4, max_len=ROUTED.max_len)
        assert torch.allclose(torch.tensor(seq), torch.tensor(hard), atol=1e-4)
        assert not torch.allclose(torch.tensor(seq), torch.tensor(plain), atol=1e-4), "the routing matters here"


def test_results_report_every_router_and_its_diagnostics(routed):
    run_dir, summary, _ = routed
    res = json.loads((run_dir / "results.json").read_text())["methods"]["solora"]
    assert summary["methods"]["solora"]["routing_diagnostics"] == res["routing_diagnostics"]
    diagnostics = res["routing_diagnostics"]
    assert list(diagnostics) == list(EVAL_ROUTERS)
    n_test = sum(res["n_test"].values())
    for router, d in diagnostics.items():
        assert set(d["accuracy"]) == set(ROUTED.tasks) == set(d["own_share"]), router
        assert len(d["selected"]) == n_test and sum(map(sum, d["confusion"])) == n_test, router
        assert d["min_accuracy"] == min(d["accuracy"].values())
    assert diagnostics["hard"]["min_accuracy"] == 1.0
    # the evidence for the default router: it picks the right cluster for every prompt of every task
    assert diagnostics["sequence"]["min_accuracy"] == 1.0
    assert (
        ExperimentConfig().router == "sequence"
        and CollabTerms(base_model="tiny-random-llama", base_fingerprint="0" * 16).router == "sequence"
    )
    # the row is the published router; every other router scores the same weights as a variant
    assert set(res["variants"]) == (set(EVAL_ROUTERS) - {"sequence"}) | set(EVAL_ANCHORS)  # and PEFT's Arrow
    for v in res["variants"].values():
        assert set(v["accuracy"]) == set(ROUTED.tasks)
    table = (run_dir / "results.md").read_text()
    assert "published MoE under the `sequence` router" in table
    assert all(f"| {r} |" in table for r in EVAL_ROUTERS)


def _stub(hub, plan, commit):
    """What moe_centroids reads of a peer program: its plan (at ``commit``), the hub, and parts for every member."""
    names = {p: f"p{i}" for i, p in enumerate(plan["members"])}
    me = plan["clusters"][0][0]
    return types.SimpleNamespace(
        plan={**plan, "collab_commit": commit}, peer_id=me, hub=hub,
        collab=types.SimpleNamespace(repo_id=collab_id(ROUTED, "solora"), hub=hub),
        view={names[p]: object() for p in plan["clusters"][0]},
        experts={c: {plan["members"].index(p): object() for p in m} for c, m in enumerate(plan["clusters"]) if c},
        name_of=lambda q: f"p{q}", index_of=plan["members"].index, terms=types.SimpleNamespace(rounds=1),
    )  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    ["nan", "width", "rows", "pool", "dtype", "garbage", "huge", "missing"],
)
def test_an_invalid_centroid_file_leaves_out_only_its_member(routed, tmp_path, bad):
    _, _, hub = routed
    plan = _plan(hub)
    repo = collab_id(ROUTED, "solora")
    moe = _load_published(hub, tmp_path)
    pool = moe.config.router_options["sequence"]["pool_layer"]
    width = pool_width(moe, pool)
    good = moe_centroids(_stub(hub, plan, plan["collab_commit"]), pool_layer=pool, width=width)
    victim = plan["clusters"][1][0]
    user, name = victim.split("/")
    path = centroids_path(user, name)
    c = read_centroids(hub, repo, victim, revision=plan["collab_commit"], pool_layer=pool, width=width)
    data = {
        "nan": lambda: centroid_bytes(torch.full_like(c, float("nan")), pool),
        "width": lambda: centroid_bytes(torch.ones(1, width + 1), pool),
        "rows": lambda: centroid_bytes(torch.ones(5, width), pool),
        "pool": lambda: centroid_bytes(c, "model.embed_tokens"),
        "dtype": lambda: centroid_bytes(c, pool).replace(b'"F32"', b'"F16"', 1)[: -c.numel() * 2],
        "garbage": lambda: b"\x00" * 64,
        "huge": lambda: b"\x00" * (MAX_CENTROID_BYTES + 1),
        "missing": None,
    }[bad]
    if data is None:  # a member that registered no centroids: another id in the plan's place
        ghost = {p: ("sorlora/ghost" if p == victim else p) for p in plan["members"]}
        plan = {**plan, "members": [ghost[p] for p in plan["members"]],
                "clusters": [[ghost[p] for p in m] for m in plan["clusters"]]}  # fmt: skip
        got = moe_centroids(_stub(hub, plan, plan["collab_commit"]), pool_layer=pool, width=width)
    else:
        sha = hub.create_commit(repo, {path: data()}, commit_message=f"tamper: {bad}")
        try:
            got = moe_centroids(_stub(hub, plan, sha), pool_layer=pool, width=width)
        finally:
            hub.create_commit(repo, {path: centroid_bytes(c, pool)}, commit_message="restore")
    assert torch.equal(got[0], good[0]), "the other cluster keeps every centroid"
    assert torch.equal(got[1], good[1][c.shape[0] :]), "only the victim's own centroids are left out"


def test_without_any_valid_centroid_the_moe_falls_back_to_the_implicit_router(routed, tmp_path, monkeypatch):
    _, _, hub = routed
    moe = _load_published(hub, tmp_path)
    moe.set_router(router="implicit")
    moe.set_centroids(None)
    program = types.SimpleNamespace(peer_id="x/y")
    monkeypatch.setattr("sorlora.protocol.publish.moe_centroids", lambda *a, **k: [None] * moe.num_experts)
    configure_router(moe, program, "sequence")
    assert moe.config.router == "implicit"
    width = moe.router.layer_widths[moe.router.layer_keys[0]]
    monkeypatch.setattr(
        "sorlora.protocol.publish.moe_centroids", lambda *a, **k: [torch.ones(1, width)] * moe.num_experts
    )
    configure_router(moe, program, "sequence")
    assert moe.config.router == "sequence" and "centroids" in moe.router.tensors


def test_router_and_centroid_epsilon_settings_are_checked():
    terms = CollabTerms(base_model="tiny-random-llama", base_fingerprint="0" * 16)
    assert terms.centroid_epsilon is None
    for bad in ({"router": "hard"}, {"router": "nope"}, {"centroid_epsilon": 0}, {"centroid_epsilon": float("inf")}):
        with pytest.raises(TermsError):
            terms.replace(**bad)
    assert terms.replace(router="implicit").sha256() != terms.sha256(), "the router is part of the terms"
    with pytest.raises(ConfigError):
        ExperimentConfig(centroid_epsilon=-1.0)
    with pytest.raises(ConfigError):
        ExperimentConfig(router="hard")
