"""Opt-in: the same gossip against the real Hugging Face Hub (not counted as coverage; never runs by default).

Run with ``SORLORA_REAL_HUB=1 HF_TOKEN=hf_... pytest -m real_hub tests/test_hub_real.py``. It creates two private
model repos ``<your user>/sorlora-gossip-test-<random>-{a,b}``, pushes and pulls two rounds, checks a stale-parent
push is refused with PushConflictError, and deletes the repos afterwards. It uses a handful of API calls (well under
the free tier's 1,000 per 5 minutes) and four commits per repo.
"""

from __future__ import annotations

import os
import uuid

import pytest

from sorlora_gossip import HfHub, Peer, PushConflictError, round_tag

from .gossip_payloads import calibrated_mlp, update_for_round

pytestmark = [
    pytest.mark.real_hub,
    pytest.mark.skipif(
        os.environ.get("SORLORA_REAL_HUB") != "1" or not os.environ.get("HF_TOKEN"),
        reason="opt-in: set SORLORA_REAL_HUB=1 and HF_TOKEN to run against the real Hugging Face Hub",
    ),
]


@pytest.fixture
def real_hub(tmp_path):
    hub = HfHub(token=os.environ["HF_TOKEN"], cache_dir=tmp_path / "cache", private=True)
    prefix = f"sorlora-gossip-test-{uuid.uuid4().hex[:8]}"
    yield hub, prefix
    for suffix in ("a", "b"):
        hub._api.delete_repo(hub.repo_id(f"{prefix}-{suffix}"), missing_ok=True)


def test_two_peers_gossip_on_the_real_hub(real_hub):
    hub, prefix = real_hub
    a, b = f"{prefix}-a", f"{prefix}-b"
    models = {a: calibrated_mlp(slot=0, seed=0), b: calibrated_mlp(slot=1, seed=1)}
    peers = {name: Peer(hub, name) for name in models}
    pushed = {}
    for r in range(2):
        for i, name in enumerate(peers):
            pushed[name, r] = peers[name].push_round(r, update_for_round(models[name], r, seed=i))
        pull = peers[a].pull_round(r, [b], timeout=120)
        assert pull.complete, (pull.skipped, pull.rejected)
        assert pull.revisions[b] == pushed[b, r].sha == hub.resolve(hub.repo_id(b), round_tag(r))
        assert pull.infos[b]["sha256"] == pushed[b, r].sha256
    stale = pushed[a, 0].sha
    with pytest.raises(PushConflictError):
        hub.create_commit(hub.repo_id(a), {"late.txt": b"x"}, commit_message="stale", parent_commit=stale)
    assert Peer(hub, a).last_pushed_round() == 1
