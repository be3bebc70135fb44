"""The peer-id claim in the collaboration repo: a fresh claim of another state directory refuses, a stale one is
taken over, the same state directory is the same claimant, a garbled claim file claims nothing, and a hub failing
while the claim is renewed never stops the running copy."""

from __future__ import annotations

import logging
import time

import pytest

from sorlora.protocol.claim import PeerClaim, PeerIdTaken, claim_path
from sorlora_gossip import LocalHub
from sorlora_gossip.hub import HubUnavailable


@pytest.fixture
def hub(tmp_path):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    hub.create_repo("lab/c")
    hub.create_commit("lab/c", {"collab.json": b"{}"}, commit_message="terms")
    return hub


def test_a_fresh_claim_refuses_a_stale_one_is_taken_over(hub, tmp_path):
    first = PeerClaim(hub, "lab/c", "ann/dev", tmp_path / "one", ttl_s=1.0)
    second = PeerClaim(hub, "lab/c", "ann/dev", tmp_path / "two", ttl_s=1.0)
    first.acquire()
    with pytest.raises(PeerIdTaken, match=r"ann/dev is already running in lab/c .*pid \d+"):
        second.acquire()
    PeerClaim(hub, "lab/c", "ann/dev", tmp_path / "one", ttl_s=1.0).acquire()  # the same state directory: itself
    time.sleep(1.1)  # the first copy stopped renewing: gone
    second.acquire()
    with pytest.raises(PeerIdTaken):
        first.acquire()
    assert PeerClaim(hub, "lab/c", "ben/dev", tmp_path / "three").read() is None, "claims are per peer id"


def test_a_garbled_claim_file_claims_nothing(hub, tmp_path):
    hub.create_commit("lab/c", {claim_path("ann/dev"): b"\xff not json"}, commit_message="junk")
    claim = PeerClaim(hub, "lab/c", "ann/dev", tmp_path / "one")
    assert claim.read() is None
    claim.acquire()
    assert claim.read()["instance"] == claim.instance


def test_a_failing_hub_while_renewing_never_stops_the_running_copy(hub, tmp_path, monkeypatch, caplog):
    claim = PeerClaim(hub, "lab/c", "ann/dev", tmp_path / "one", ttl_s=0.2)
    claim.acquire()
    time.sleep(0.15)

    def down(*args, **kwargs):
        raise HubUnavailable("endpoint down")

    monkeypatch.setattr(hub, "create_commit", down)
    with caplog.at_level(logging.WARNING, logger="sorlora.protocol.claim"):
        claim.renew()  # due, fails: logged, not raised
    assert "could not renew its claim" in caplog.text
