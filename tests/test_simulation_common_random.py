"""Common random numbers (issue 21): in a simulated run every method's peer i trains on the same shard in the same
batch order (seeded by the seed and the peer's data identity, never by a repo id that names the method), and a
real peer's batches follow its own name."""

from __future__ import annotations

import torch

from peft_sorlora.base_model import base_fingerprint
from sorlora.protocol.collab import create_collaboration
from sorlora.protocol.program import CALIBRATION, PeerData, PeerProgram
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.config import ExperimentConfig
from sorlora.simulation.engines.local import InProcessEngine
from sorlora.simulation.setup import collab_id, load_tasks, peer_repo, task_shards, terms_for
from sorlora_gossip import LocalHub

CFG = ExperimentConfig(tasks=("synthetic-alpha", "synthetic-beta"), methods=("solora", "oracle", "solora-union"),
                       peers=4, n_train=24, n_test=2, n_validation=0, local_steps=3, batch_size=4, max_len=32)  # fmt: skip


def _batches(tmp_path, method: str, peer: int, shards, engine, *, peer_id: str | None = None):
    hub = LocalHub(tmp_path / "hub", namespace=CFG.hub_namespace)
    base = engine.base
    terms = terms_for(CFG, method, base_model=TINY_BASE_ID, fingerprint=base_fingerprint(base))
    if not hub.repo_exists(collab_id(CFG, method)):
        create_collaboration(hub, collab_id(CFG, method), terms)
    pid = peer_id or peer_repo(CFG, method, peer)
    program = PeerProgram(hub=hub, collab_id=collab_id(CFG, method), peer_id=pid, state_dir=tmp_path / pid,
                          workspace=engine.workspace, data=PeerData(task=CFG.task_of(peer), train=shards[peer]))  # fmt: skip
    program._prepare()
    return [program.batches(r) for r in (CALIBRATION, 0, 1, 2)]


def _same(a, b) -> bool:
    return all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra, rb, strict=True)
    )


def test_every_methods_peer_draws_the_same_batches(tmp_path):
    base, tokenizer, _ = load_base(TINY_BASE_ID)
    engine = InProcessEngine(base=base, tokenizer=tokenizer, progress=False)
    try:
        shards = task_shards(CFG, load_tasks(CFG))
        for peer in range(CFG.peers):
            draws = [_batches(tmp_path, m, peer, shards, engine) for m in CFG.methods]
            assert all(_same(draws[0], d) for d in draws[1:]), f"peer {peer}: the methods train on other batches"
        assert not _same(
            _batches(tmp_path, "solora", 0, shards, engine), _batches(tmp_path, "solora", 2, shards, engine)
        )
        other = _batches(tmp_path, "solora", 0, shards, engine, peer_id=f"{CFG.hub_namespace}/peer00")
        assert _same(other, _batches(tmp_path, "oracle", 0, shards, engine)), (
            "the data identity is the name sans method"
        )
        mine = _batches(tmp_path, "solora", 0, shards, engine, peer_id="ann/phone")
        assert not _same(mine, other), "a real peer's batches follow its own name"
    finally:
        engine.release()
