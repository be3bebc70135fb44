"""Peers gossiping through hub repos: rounds pushed and pulled over both backends, by concurrent threads."""

from __future__ import annotations

import hashlib
import json
import threading

import networkx as nx
import pytest
import torch

from peft_sorlora import apply_sparse_update, get_sparse_update
from sorlora_gossip import Peer, PushResult, round_tag
from sorlora_gossip.hub import InvalidNameError
from sorlora_gossip.peer import INFO_FILE, UPDATE_FILE

from .gossip_payloads import BASE_MODEL, calibrated_mlp, update_for_round

PEERS = [f"peer{i}" for i in range(6)]
CLUSTER = {p: i // 3 for i, p in enumerate(PEERS)}  # two clusters of three
ROUNDS = 3


def neighbour_sets(kind: str) -> dict[str, list[str]]:
    """Ring (each peer and its two ring neighbours) or cluster (the other members of its cluster)."""
    if kind == "ring":
        graph = nx.relabel_nodes(nx.cycle_graph(len(PEERS)), dict(enumerate(PEERS)))
        return {p: sorted(graph.neighbors(p)) for p in PEERS}
    return {p: [q for q in PEERS if q != p and CLUSTER[q] == CLUSTER[p]] for p in PEERS}


@pytest.mark.parametrize("topology", ["ring", "cluster"])
def test_peers_gossip_three_rounds_concurrently(hub, new_hub, topology):
    neighbours = neighbour_sets(topology)
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(PEERS)}
    updates = {p: [update_for_round(models[p], r, seed=i) for r in range(ROUNDS)] for i, p in enumerate(PEERS)}
    pushed: dict[tuple[str, int], PushResult] = {}
    pulls: dict[tuple[str, int], object] = {}
    errors: list[BaseException] = []

    def run(peer_id: str) -> None:
        try:
            peer = Peer(new_hub(), peer_id, task=f"task{CLUSTER[peer_id]}", cluster=CLUSTER[peer_id])
            for r in range(ROUNDS):
                result = peer.push_round(r, updates[peer_id][r], metrics={"loss": 1.0 / (r + 1)})
                assert result.created
                pushed[peer_id, r] = result
                pulls[peer_id, r] = peer.pull_round(r, neighbours[peer_id], timeout=60, poll_interval=0.05)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in PEERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    for p in PEERS:
        repo = hub.repo_id(p)
        history = hub.list_commits(repo)
        assert [c.message for c in history] == [f"{p}: round-{r:04d}" for r in reversed(range(ROUNDS))] + [
            "initial commit"
        ], "every round exactly once, in order"
        assert hub.list_refs(repo).tags == {round_tag(r): history[ROUNDS - 1 - r].sha for r in range(ROUNDS)}
        for r in range(ROUNDS):
            data = hub.read_bytes(repo, UPDATE_FILE, revision=round_tag(r))
            assert (len(data), hashlib.sha256(data).hexdigest()) == (pushed[p, r].bytes, pushed[p, r].sha256)
            info = json.loads(hub.read_bytes(repo, INFO_FILE, revision=round_tag(r)))
            assert (info["peer_id"], info["round"], info["cluster"]) == (p, r, CLUSTER[p])
            assert (info["bytes"], info["sha256"]) == (pushed[p, r].bytes, pushed[p, r].sha256)
            assert info["metrics"] == {"loss": 1.0 / (r + 1)}

    for (p, r), pull in pulls.items():
        assert pull.complete, (p, r, pull.skipped, pull.rejected)
        assert sorted(pull.updates) == neighbours[p]
        for q, update in pull.updates.items():
            assert pull.infos[q]["sha256"] == pushed[q, r].sha256, "pulled bytes equal pushed bytes (checked)"
            assert pull.bytes[q] == pushed[q, r].bytes
            assert pull.revisions[q] == hub.resolve(hub.repo_id(q), round_tag(r)), "pinned to the round's tag"
            for key, values in updates[q][r].values.items():
                assert torch.equal(update.values[key], values)
    if topology == "cluster":
        for p in PEERS:
            assert all(CLUSTER[q] == CLUSTER[p] for q in pulls[p, 0].updates)


def test_pulled_updates_apply_to_a_model_as_neighbour_adapters(hub):
    sender_model, receiver_model = calibrated_mlp(slot=1, seed=1), calibrated_mlp(slot=0, seed=0)
    sender, receiver = Peer(hub, "sender"), Peer(hub, "receiver")
    for r in range(2):
        sender.push_round(r, update_for_round(sender_model, r, seed=1))
        pull = receiver.pull_round(r, ["sender"], timeout=5)
        assert pull.complete
        apply_sparse_update(receiver_model, pull.updates["sender"], "sender", create=(r == 0))
    sent = {n: m for n, m in sender_model.named_modules() if hasattr(m, "solora_B")}
    for name, module in receiver_model.named_modules():
        if hasattr(module, "solora_B") and "sender" in module.solora_B:
            torch.testing.assert_close(module.get_delta_weight("sender"), sent[name].get_delta_weight("default"))


def test_push_round_order_structure_and_idempotence(hub):
    model = calibrated_mlp()
    peer = Peer(hub, "orderly", task="t", cluster="c0")
    with pytest.raises(ValueError, match="round 0 must carry the masks"):
        peer.push_round(0, get_sparse_update(model, round=0, include_structure=False))
    with pytest.raises(ValueError, match="later rounds carry values only"):
        peer.push_round(1, get_sparse_update(model, round=1, include_structure=True))
    with pytest.raises(ValueError, match="next round is 0"):
        peer.push_round(1, update_for_round(model, 1, seed=0))
    first = peer.push_round(0, update_for_round(model, 0, seed=0))
    with pytest.raises(ValueError, match="update is for round 1, not 2"):
        peer.push_round(2, update_for_round(model, 1, seed=0))
    with pytest.raises(ValueError, match="finite"):
        peer.push_round(1, update_for_round(model, 1, seed=0), metrics={"loss": float("nan")})
    again = peer.push_round(0, update_for_round(model, 0, seed=0))
    assert (again.sha, again.created, first.created) == (first.sha, False, True)
    assert len(hub.list_commits(peer.repo_id)) == 2, "re-pushing a round makes no commit"
    other = calibrated_mlp(base_model="someone/else")
    with pytest.raises(ValueError, match="base model"):
        peer.push_round(1, update_for_round(other, 1, seed=0))
    assert peer.last_pushed_round() == 0
    with pytest.raises(InvalidNameError):
        Peer(hub, "../escape")


def test_pull_is_reproducible_and_recorded_in_the_next_push(hub):
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["a", "b"])}
    peers = {p: Peer(hub, p) for p in models}
    for r in range(3):
        for i, p in enumerate(peers):
            peers[p].push_round(r, update_for_round(models[p], r, seed=i))
        if r == 1:
            first = peers["a"].pull_round(1, ["b"], timeout=5)
    later = Peer(hub, "c", base_model=BASE_MODEL).pull_round(1, ["b"], timeout=5)
    assert later.revisions == first.revisions
    assert later.infos["b"]["sha256"] == first.infos["b"]["sha256"], "round 1 still pulls the round-1 bytes"
    for key, values in first.updates["b"].values.items():
        assert torch.equal(later.updates["b"].values[key], values)
    peers["a"].pull_round(2, ["b"], timeout=5)
    peers["a"].push_round(3, update_for_round(models["a"], 3, seed=0))
    info = json.loads(hub.read_bytes(hub.repo_id("a"), INFO_FILE, revision=round_tag(3)))
    assert info["previous_pull"] == {
        "round": 2,
        "used": {"b": hub.resolve(hub.repo_id("b"), round_tag(2))},
        "skipped": {},
        "rejected": {},
    }


def test_cli_push_pull_status_on_both_backends(hub, tmp_path, capsys, monkeypatch):
    import argparse

    from sorlora_gossip.cli import add_gossip_commands

    parser = argparse.ArgumentParser(prog="sorlora")
    add_gossip_commands(parser.add_subparsers(dest="command", required=True))
    location = str(hub.root) if hasattr(hub, "root") else hub.endpoint
    if not hasattr(hub, "root"):
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cli-cache"))

    def run(*argv: str) -> str:
        args = parser.parse_args([argv[0], "--hub", location, "--namespace", "gossip", *argv[1:]])
        assert args.func(args) == 0
        return capsys.readouterr().out

    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["a", "b"])}
    for r in range(2):
        for i, p in enumerate(models):
            payload = tmp_path / f"{p}-{r}.safetensors"
            payload.write_bytes(update_for_round(models[p], r, seed=i).to_bytes())
            out = run("push", "--peer", p, "--round", str(r), "--payload", str(payload), "--task", f"t{i}",
                      "--metric", "loss=0.5")  # fmt: skip
            assert f"{p} round {r}: pushed as {hub.resolve(hub.repo_id(p), round_tag(r))}" in out
    out = run(
        "pull", "--peer", "a", "--round", "1", "--neighbours", "b", "--timeout", "5", "--out", str(tmp_path / "in")
    )
    assert f"b: {hub.resolve(hub.repo_id('b'), round_tag(1))}" in out
    pulled = (tmp_path / "in" / "b.round-0001.safetensors").read_bytes()
    assert pulled == (tmp_path / "b-1.safetensors").read_bytes(), "pulled bytes equal pushed bytes"
    pushed_a = (tmp_path / "a-1.safetensors").read_bytes()
    status = run("status")
    rows = {line.split()[0]: line.split() for line in status.splitlines()[1:-1]}
    assert rows["a"][:5] == ["a", hub.resolve(hub.repo_id("a"))[:12], "1", "2", str(len(pushed_a))]
    assert rows["b"][4] == str(len(pulled)) and rows["b"][5] == "t1"
    assert "2 peer(s)" in status.splitlines()[-1]
