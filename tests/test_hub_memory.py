"""Memory stays bounded under hostile load (generous margins; the figures are measured in benchmarks/hub_memory.py):
a neighbour publishing a 2 GiB file, a client streaming it from hub-serve, and 300 idle connections."""

from __future__ import annotations

import time

import pytest

from benchmarks.common import PeakRSS
from benchmarks.hub_memory import idle_connections, publish_big_round, stream_file
from sorlora_gossip import HfHub, Peer
from sorlora_gossip.hub import HubServer
from sorlora_gossip.layout import UPDATE_FILE

from .conftest import FAST_BACKOFF
from .gossip_payloads import calibrated_mlp, update_for_round

GiB, MiB = 1 << 30, 1 << 20
MARGIN = 256 * MiB  # a whole-file read would cost 2048 MiB


@pytest.fixture(scope="module")
def big_world(tmp_path_factory):
    """hub-serve over a folder where 'evil' published a 2 GiB (sparse) round-1 payload; 'good' an honest one."""
    tmp_path = tmp_path_factory.mktemp("big")
    with HubServer(tmp_path / "root", request_timeout=2.0, max_connections=64) as server:
        hub = server.hub
        models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["me", "good", "evil"])}
        for i, p in enumerate(models):
            Peer(hub, p).push_round(0, update_for_round(models[p], 0, seed=i))
        Peer(hub, "good").push_round(1, update_for_round(models["good"], 1, seed=1))
        sha = publish_big_round(hub, "evil", 1, 2 * GiB, tmp_path)
        yield server, sha


def test_a_2gib_neighbour_file_is_refused_before_download_and_costs_no_memory(big_world, tmp_path):
    server, sha = big_world
    client = HfHub(server.endpoint, namespace="gossip", cache_dir=tmp_path / "cache", **FAST_BACKOFF)
    with PeakRSS() as peak:
        pull = Peer(client, "me").pull_round(1, ["good", "evil"], timeout=10)
    assert list(pull.updates) == ["good"]
    assert "not downloaded" in pull.rejected["evil"].reason and sha in str(pull.rejected["evil"])
    assert not any(p.endswith(f"/evil/resolve/{sha}/{UPDATE_FILE}") for _, p in server.requests)
    assert peak.delta < MARGIN, f"pulling grew RSS by {peak.delta / MiB:.0f} MiB"


def test_hub_serve_streams_a_2gib_file_without_holding_it(big_world):
    server, sha = big_world
    with PeakRSS() as peak:
        received = stream_file(server.endpoint, "gossip/evil", UPDATE_FILE, sha)
    assert received == 2 * GiB
    assert peak.delta < MARGIN, f"serving 2 GiB grew RSS (server and client) by {peak.delta / MiB:.0f} MiB"


def test_300_idle_connections_are_bounded_and_time_out(tmp_path):
    with HubServer(tmp_path / "root", request_timeout=1.0, max_connections=64) as server:
        server.hub.create_repo("gossip/x")
        with PeakRSS() as peak:
            sockets = idle_connections(server.endpoint, 300)
            time.sleep(0.3)
            assert server.active_connections <= 64, "beyond max_connections a connection gets a quick 503"
        refused = 0
        for conn in sockets:
            conn.settimeout(5)
            try:
                answer = conn.recv(64)
            except OSError:
                answer = b""
            refused += answer.startswith(b"HTTP/1.1 503") or answer.startswith(b"HTTP/1.1 408") or answer == b""
            conn.close()
        assert refused == 300, "every silent connection is answered or closed within seconds"
        deadline = time.monotonic() + 10
        while server.active_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.active_connections == 0
        assert peak.delta < 128 * MiB, f"300 idle connections grew RSS by {peak.delta / MiB:.0f} MiB"
        hub = HfHub(server.endpoint, namespace="gossip", cache_dir=tmp_path / "c", **FAST_BACKOFF)
        assert hub.resolve("gossip/x"), "served normally afterwards"
