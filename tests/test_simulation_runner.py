"""The simulation end to end on a tiny random model and generated tasks: every method is a collaboration of peer
programs on a hub; the runner evaluates what they published; a SIGKILLed run resumes to the same table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sorlora.methods.specs import METHODS
from sorlora.protocol.program import CRASH_ENV
from sorlora.simulation.config import ExperimentConfig
from sorlora.simulation.runner import run_experiment

TINY = ExperimentConfig(
    model="tiny-random",
    tasks=("synthetic-alpha", "synthetic-beta"),
    peers=4,
    rounds=2,
    local_steps=2,
    batch_size=4,
    max_len=48,
    n_train=16,
    n_test=6,
    n_curve=3,
    rank=4,
    sparsity=0.5,
    s_max=0.5,
    eval_batch_size=8,
    threads=1,
)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unbroken")
    return run_dir, run_experiment(TINY, run_dir, progress=False)


def test_every_method_runs_and_reports(unbroken):
    run_dir, summary = unbroken
    assert list(summary["methods"]) == list(METHODS)
    for res in summary["methods"].values():
        assert set(res["accuracy"]) == set(TINY.tasks)
        assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
        assert len(res["curve"]) == TINY.rounds
        assert len(res["train_loss"]) == TINY.rounds
    for name in ("results.json", "results.md", "accuracy_vs_round.png", "bytes_vs_round.png", "topology.png"):
        assert (run_dir / name).stat().st_size > 0
    table = (run_dir / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table


def test_communication_accounting_is_consistent(unbroken):
    _, summary = unbroken
    methods = summary["methods"]
    assert methods["local"]["bytes_transmitted"] == 0
    # SO-LoRA sends only masked B values; dense LoRA sends A and B: far fewer parameters per link and round
    assert methods["lori"]["params_transmitted_per_round"] < methods["lora"]["params_transmitted_per_round"]
    assert methods["solora"]["params_updated"] < methods["lora"]["params_updated"]
    assert methods["solora-single"]["collision_rate"] >= methods["solora"]["collision_rate"]
    assert methods["lora"]["collision_rate"] is None


def test_moe_router_settings_are_chosen_on_validation_questions(unbroken):
    _, summary = unbroken
    router = summary["methods"]["solora"]["router"]
    assert len(router["validation"]) == 9, "k in {r, 2r, all} x refinement in {task_stats, routing, none}"
    assert router["validation"][router["chosen"]] == max(router["validation"].values())
    assert router["router_top_k"] in (TINY.rank, 2 * TINY.rank, "all")
    assert summary["methods"]["lora"]["router"] is None


def test_the_moe_diagnostics_are_measured_and_reported(unbroken):
    run_dir, summary = unbroken
    res = summary["methods"]["solora"]
    routing = res["routing"]
    assert set(routing) == set(TINY.tasks)
    for r in routing.values():
        assert len(r["shares"]) == len(res["clusters"]) and abs(sum(r["shares"]) - 1) < 1e-6
        assert r["own_share"] == r["shares"][r["own_expert"]] and 0 <= r["own_share"] <= 1
        assert r["uniform"] == 1 / len(res["clusters"])
    assert set(res["variants"]) >= {"sum", "arrow"}  # arrow: the same experts through PEFT's Arrow
    table = (run_dir / "results.md").read_text()
    assert "router settings, chosen on validation questions" in table
    assert "belong to the task's own expert" in table and "sum:" in table
    assert summary["methods"]["lora"]["routing"] is None


def test_every_round_of_every_peer_is_on_the_hub_once(unbroken):
    run_dir, _ = unbroken
    from sorlora_gossip import LocalHub, Peer

    hub = LocalHub(run_dir / "hub", namespace=TINY.hub_namespace)
    for method in ("solora", "lora"):
        for p in range(TINY.peers):
            peer = Peer(hub, f"{TINY.hub_namespace}/{method}-peer{p:02d}")
            assert peer.last_pushed_round() == TINY.rounds - 1
            pushes = [c.message for c in hub.list_commits(peer.repo_id) if "round-" in c.message]
            assert len(pushes) == TINY.rounds and len(set(pushes)) == TINY.rounds, pushes


def test_the_peers_agreed_on_one_plan_and_counted_the_inter_cluster_bytes(unbroken):
    run_dir, summary = unbroken
    from sorlora.protocol.collab import Collaboration
    from sorlora.protocol.plan import compute_plan
    from sorlora_gossip import LocalHub

    hub = LocalHub(run_dir / "hub", namespace=TINY.hub_namespace)
    collab = Collaboration(hub, f"{TINY.hub_namespace}/collab-solora")
    closing = collab.closing()
    assert len(closing.registrations) == TINY.peers
    plan = collab.read_plan()
    assert plan == compute_plan(collab.terms(), closing.registrations, collab_commit=closing.commit)
    assert summary["methods"]["solora"]["clusters"] == [[plan["members"].index(p) for p in c] for c in plan["clusters"]]
    solora = summary["methods"]["solora"]
    if len(plan["clusters"]) > 1:
        assert solora["inter_cluster_bytes"] > 0
    assert solora["bytes_transmitted"] == solora["round_bytes"] + solora["inter_cluster_bytes"]
    assert sum(solora["bytes_by_round"]) == solora["bytes_transmitted"], "the plot counts every byte too"
    if solora["inter_cluster_bytes"]:
        assert "the inter-cluster exchange included" in (run_dir / "results.md").read_text()
    assert all(r["inter_cluster_bytes"] == 0 for m, r in summary["methods"].items() if m != "solora")


def test_killed_run_resumes_to_the_same_table(unbroken, tmp_path):
    unbroken_dir, expected = unbroken
    run_dir = tmp_path / "killed"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    cmd = [
        sys.executable,
        "-m",
        "sorlora",
        "run",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]
    env = dict(os.environ, **{CRASH_ENV: f"{TINY.hub_namespace}/solora-peer02:pushed:1"})
    crashed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -9, crashed.stderr[-2000:]  # SIGKILL, mid-round: pushed round 1, not pulled
    assert not (run_dir / "results.json").exists()
    state = json.loads((run_dir / "methods" / "solora" / "peers" / "peer02" / "state.json").read_text())
    assert (state["phase"], state["round"]) == ("train", 1), "the kill struck before the state moved on"
    env.pop(CRASH_ENV)
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "results.json").read_text())
    for method, res in expected["methods"].items():
        got = summary["methods"][method]
        assert got["accuracy"] == res["accuracy"], method
        assert got["bytes_transmitted"] == res["bytes_transmitted"], method
        assert got["train_loss"] == res["train_loss"], method
    assert (run_dir / "results.md").read_text() == (unbroken_dir / "results.md").read_text()


def test_other_settings_in_the_same_run_dir_are_refused(unbroken):
    run_dir, _ = unbroken
    with pytest.raises(ValueError, match="other settings"):
        run_experiment(TINY.replace(rounds=3), run_dir, progress=False)


def test_run_publishes_peer_cards_final_adapters_and_the_moe(unbroken, tmp_path):
    from huggingface_hub import ModelCard
    from peft import PeftModel

    from model_cards import check_card
    from sorlora.simulation.setup import load_model
    from sorlora_gossip import LocalHub

    run_dir, summary = unbroken
    hub = LocalHub(run_dir / "hub", namespace=TINY.hub_namespace)
    repo = hub.repo_id("solora-peer01")  # hub namespace = TINY.hub_namespace: the simulated users' namespace
    files = set(hub.list_files(repo, revision="final"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "update.safetensors"} <= files
    card = check_card(ModelCard.load(hub.download(repo, "README.md", revision="final")), kind="adapter")
    assert card.data.base_model == "tiny-random-llama"
    report = json.loads(hub.read_bytes(repo, "report.json", revision="final"))
    assert [rec["round"] for rec in report["records"]] == list(range(TINY.rounds))
    # the published adapter is a real PEFT adapter that loads onto the base model
    import peft_sorlora  # noqa: F401  (registers the method before from_pretrained)

    base, _, _ = load_model(TINY)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(hub.read_bytes(repo, name, revision="final"))
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert loaded.peft_config["default"].layer_sparsity
    # the collaboration of the MoE method has one implicit MoE, which every report names and the Auto class loads
    from transformers import AutoModelForCausalLM

    import moe_router  # noqa: F401  (registers the model type)

    moe_repo = json.loads(hub.read_bytes(hub.repo_id("solora-peer01"), "report.json", revision="final"))["moe"]["repo"]
    local = tmp_path / "moe"
    for name in hub.list_files(moe_repo):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(hub.read_bytes(moe_repo, name, revision="main"))
    moe = AutoModelForCausalLM.from_pretrained(local)
    assert moe.config.model_type == "solora_moe" and moe.num_experts == len(summary["methods"]["solora"]["clusters"])
    assert "README.md" not in hub.list_files(hub.repo_id("lora-peer00"), revision="final"), (
        "dense LoRA baseline repos carry no SO-LoRA card"
    )


def test_no_absolute_local_path_in_anything_published(unbroken):
    run_dir, _ = unbroken
    from sorlora_gossip import LocalHub

    hub = LocalHub(run_dir / "hub", namespace=TINY.hub_namespace)
    for repo in hub.list_repos():
        for revision in {"main", *hub.list_refs(repo).tags}:
            for name in hub.list_files(repo, revision=revision):
                data = hub.read_bytes(repo, name, revision=revision)
                assert b"site-packages" not in data and str(run_dir).encode() not in data, (repo, revision, name)
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".safetensors") and "hub" not in path.parts:
            assert b"site-packages" not in path.read_bytes(), path
