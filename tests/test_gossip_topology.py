"""Topologies: collision rate properties, AGNES cluster topology under power/delay constraints, baselines, plot."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_sorlora import collision_rate
from sorlora_gossip.plot import plot_topology
from sorlora_gossip.topology import (
    cluster_collision_rate,
    cluster_topology,
    clusters,
    fully_connected,
    neighbours,
    random_topology,
    ring,
    single_cluster,
)
from sorlora_gossip.wireless import ChannelParams, channel_gains, is_feasible, place_peers

fractions = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(fractions, min_size=0, max_size=12))
def test_collision_rate_in_unit_interval(s):
    rate = cluster_collision_rate(s) if s else collision_rate(s)
    assert 0.0 <= rate <= 1.0


@given(fractions)
def test_single_peer_never_collides(s):
    assert cluster_collision_rate([s]) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 0.99), min_size=1, max_size=10), st.floats(0.0, 0.99), st.floats(0.0, 1.0))
def test_collision_rate_grows_with_peers_and_sparsity(s, extra, bump):
    base = cluster_collision_rate(s)
    assert cluster_collision_rate([*s, extra]) >= base - 1e-12  # one more peer never lowers S
    denser = [min(1.0, s[0] + bump * (1.0 - s[0])), *s[1:]]
    assert cluster_collision_rate(denser) >= base - 1e-12  # keeping more entries never lowers S


def test_collision_rate_matches_eq19_and_layer_weights():
    s = np.array([[0.1, 0.5], [0.2, 0.5], [0.3, 0.0]])
    per_layer = [collision_rate(s[:, 0]), collision_rate(s[:, 1])]
    # Eq. 19 by hand for layer 0.
    q = 1 - s[:, 0]
    exactly_one = sum(s[j, 0] * np.prod(np.delete(q, j)) for j in range(3))
    assert per_layer[0] == pytest.approx(1 - np.prod(q) - exactly_one)
    assert cluster_collision_rate(s) == pytest.approx(np.mean(per_layer))
    assert cluster_collision_rate(s, layer_weights=[3, 1]) == pytest.approx((3 * per_layer[0] + per_layer[1]) / 4)


def _check_clusters(g: nx.Graph, n: int, s: np.ndarray, s_max: float, payload_bits: float, channel: ChannelParams):
    groups = clusters(g)
    # Every peer in exactly one cluster.
    assert sorted(v for grp in groups for v in grp) == list(range(n))
    gains = g.graph["gains"]
    for c, members in enumerate(groups):
        members = sorted(members)
        rate = cluster_collision_rate(s[members])
        assert g.graph["collision_rate"][c] == pytest.approx(rate)
        if len(members) > 1:
            assert rate <= s_max + 1e-12
            for i in members:
                others = [j for j in members if j != i]
                assert is_feasible(payload_bits, gains[i, others], params=channel)
                assert sorted(neighbours(g, i)) == others  # intra-cluster clique, no other links
        assert all(g.nodes[v]["cluster"] == c for v in members)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    s_max=st.floats(0.0, 1.0),
    payload_bits=st.sampled_from([1e4, 1e6, 5e6, 2e7]),
    layers=st.integers(1, 3),
)
def test_clusters_respect_s_max_and_power(n, seed, s_max, payload_bits, layers):
    channel = ChannelParams(p_max_w=0.05)
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.01, 0.6, size=(n, layers))
    pos = place_peers(n, radius=channel.radius_m, seed=seed)
    g = cluster_topology(pos, s, s_max=s_max, payload_bits=payload_bits, channel=channel, seed=seed)
    _check_clusters(g, n, s, s_max, payload_bits, channel)


def test_agnes_stops_only_when_no_merge_is_allowed():
    n, channel, payload = 10, ChannelParams(), 3e6
    rng = np.random.default_rng(0)
    s = rng.uniform(0.05, 0.3, size=(n, 4))
    pos = place_peers(n, seed=1)
    g = cluster_topology(pos, s, s_max=0.1, payload_bits=payload, channel=channel, seed=1)
    groups = [sorted(c) for c in clusters(g)]
    assert 1 < len(groups) < n  # this setting merges some peers but not all
    gains = channel_gains(pos, seed=1, params=channel)
    np.testing.assert_array_equal(g.graph["gains"], gains)
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            union = sorted(groups[a] + groups[b])
            allowed = cluster_collision_rate(s[union]) <= 0.1 and all(
                is_feasible(payload, gains[i, [j for j in union if j != i]], params=channel) for i in union
            )
            assert not allowed, f"clusters {groups[a]} and {groups[b]} could still merge"
    # A larger S_max merges at least as much; S_max = 0 with positive sparsities keeps singletons.
    looser = cluster_topology(pos, s, s_max=0.5, payload_bits=payload, channel=channel, seed=1)
    assert len(clusters(looser)) <= len(groups)
    assert len(clusters(cluster_topology(pos, s, s_max=0.0, payload_bits=payload, seed=1))) == n


def test_equal_collision_rates_merge_the_cheapest_pair():
    # Equal budgets make S depend on cluster size only; the tie goes to the union needing the least power (near peers).
    pos = np.array([[-80.0, 0.0], [60.0, 5.0], [-78.0, 2.0], [62.0, 0.0]])
    s = np.full(4, 0.2)
    s_max = (cluster_collision_rate(s[:2]) + cluster_collision_rate(s[:3])) / 2  # pairs allowed, triples not
    g = cluster_topology(pos, s, s_max=s_max, payload_bits=1e5, seed=0)
    assert clusters(g) == [{0, 2}, {1, 3}]


def test_power_limit_splits_clusters():
    n = 8
    s = np.full(n, 0.01)
    pos = place_peers(n, seed=2)
    cheap = cluster_topology(pos, s, s_max=1.0, payload_bits=1e4, seed=2)
    assert len(clusters(cheap)) == 1  # tiny payload: everybody fits in one cluster
    costly = cluster_topology(pos, s, s_max=1.0, payload_bits=3e7, seed=2)
    assert len(clusters(costly)) > 1  # a big payload over many links exceeds p_max


def test_cluster_topology_on_a_graph_uses_its_edges_as_neighbourhood():
    pos = place_peers(6, seed=0)
    path = nx.path_graph(6)
    for v in path:
        path.nodes[v]["pos"] = tuple(pos[v])
    g = cluster_topology(path, [0.01] * 6, s_max=1.0, payload_bits=1e3, seed=0)
    # Only neighbouring clusters merge; the path is connected so everybody ends up together.
    assert clusters(g) == [set(range(6))]
    split = nx.Graph([(0, 1), (2, 3), (4, 5)])
    for v in split:
        split.nodes[v]["pos"] = tuple(pos[v])
    g2 = cluster_topology(split, [0.01] * 6, s_max=1.0, payload_bits=1e3, seed=0)
    assert clusters(g2) == [{0, 1}, {2, 3}, {4, 5}]


def test_cluster_topology_bad_input():
    pos = place_peers(4, seed=0)
    with pytest.raises(ValueError, match="s_max"):
        cluster_topology(pos, [0.1] * 4, s_max=1.5, payload_bits=1e3)
    with pytest.raises(ValueError, match="one entry"):
        cluster_topology(pos, [0.1] * 3, s_max=0.5, payload_bits=1e3)
    with pytest.raises(ValueError, match="pos"):
        cluster_topology(nx.path_graph(3), [0.1] * 3, s_max=0.5, payload_bits=1e3)


def test_baselines():
    g = random_topology(10, degree=3, seed=5)
    assert all(d == 3 for _, d in g.degree()) and g.graph["kind"] == "random"
    assert nx.utils.graphs_equal(g, random_topology(10, degree=3, seed=5))
    with pytest.raises(ValueError, match="even"):
        random_topology(5, degree=3)
    r = ring(5)
    assert neighbours(r, 0) == [1, 4] and all(d == 2 for _, d in r.degree())
    assert clusters(single_cluster(4)) == [{0, 1, 2, 3}]
    fc = fully_connected(5, positions=place_peers(5, seed=0))
    assert fc.number_of_edges() == 10 and "pos" in fc.nodes[0]
    assert ring(1).number_of_edges() == 0 and ring(2).number_of_edges() == 1
    with pytest.raises(ValueError, match="not in the topology"):
        neighbours(r, 9)


def test_plot_writes_png(tmp_path):
    pos = place_peers(9, seed=0)
    s = np.random.default_rng(0).uniform(0.05, 0.3, size=9)
    g = cluster_topology(pos, s, s_max=0.1, payload_bits=1e6, seed=0)
    out = plot_topology(g, tmp_path / "topology.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert plot_topology(ring(6), tmp_path / "ring.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="PNG"):
        plot_topology(g, tmp_path / "topology.svg")
