"""Wireless channel model: placement, fading gains, Shannon rate, Eq. 8 delay and Lemma 1 minimum power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sorlora_gossip.wireless import (
    ChannelParams,
    channel_gains,
    is_feasible,
    link_delay,
    link_rate,
    min_power,
    peer_power,
    place_peers,
)


def test_place_peers_in_disc_and_seeded():
    pos = place_peers(500, radius=50.0, seed=3)
    assert pos.shape == (500, 2)
    assert np.all(np.linalg.norm(pos, axis=1) <= 50.0)
    np.testing.assert_array_equal(pos, place_peers(500, radius=50.0, seed=3))
    assert not np.array_equal(pos, place_peers(500, radius=50.0, seed=4))
    # Uniform in area: about a quarter of the peers lie within half the radius.
    inner = np.mean(np.linalg.norm(pos, axis=1) <= 25.0)
    assert 0.18 < inner < 0.32


def test_channel_gains_symmetric_and_path_loss():
    params = ChannelParams()
    pos = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 40.0]])
    g = channel_gains(pos, seed=1, params=params)
    np.testing.assert_array_equal(g, g.T)
    assert np.all(np.diag(g) == 0) and np.all(g[~np.eye(3, dtype=bool)] > 0)
    # Mean gain over many fading draws follows g0 d^-2 (Rayleigh power gain has mean 1).
    draws = np.array([channel_gains(pos, seed=s, params=params)[0, 1] for s in range(4000)])
    assert draws.mean() == pytest.approx(params.reference_gain * 10.0**-2, rel=0.06)


def test_rate_and_delay_formula():
    params = ChannelParams(bandwidth_hz=2e6, noise_power_w=1e-12)
    rate = link_rate(0.1, 1e-9, num_links=4, params=params)
    assert rate == pytest.approx(2e6 / 4 * math.log2(1 + 0.1 * 1e-9 / 1e-12))
    assert link_delay(1e6, 0.1, 1e-9, num_links=4, params=params) == pytest.approx(1e6 / rate)
    assert link_delay(1e6, 0.0, 1e-9, num_links=4, params=params) == math.inf
    assert link_delay(0, 0.1, 1e-9, num_links=4, params=params) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    q_bits=st.floats(1e3, 5e7),
    gain=st.floats(1e-12, 1e-3),
    links=st.integers(1, 12),
    gamma=st.floats(0.05, 20.0),
)
def test_delay_at_min_power_equals_bound(q_bits, gain, links, gamma):
    params = ChannelParams(delay_bound_s=gamma)
    p = min_power(q_bits, gain, num_links=links, params=params)
    if not math.isfinite(p) or p > 1e30:  # exponent too large for float64: the bound is unreachable
        return
    assert link_delay(q_bits, p, gain, num_links=links, params=params) == pytest.approx(gamma, rel=1e-6)
    # Less power misses the bound.
    assert link_delay(q_bits, 0.99 * p, gain, num_links=links, params=params) > gamma


def test_feasibility_against_p_max():
    params = ChannelParams(p_max_w=0.2)
    gains = np.array([1e-7, 2e-7, 5e-8])
    total = peer_power(1e5, gains, params=params)
    assert total == pytest.approx(sum(min_power(1e5, h, num_links=3, params=params) for h in gains))
    assert is_feasible(1e5, gains, params=params)
    assert not is_feasible(1e5, gains, params=ChannelParams(p_max_w=total * 0.999))
    # A bigger payload over more links needs more power: power grows with Q |u| exponentially.
    assert peer_power(1e7, gains, params=params) > peer_power(1e5, gains, params=params)
    assert peer_power(1e5, np.array([]), params=params) == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="noise_power_w"):
        ChannelParams(noise_power_w=0.0)
    with pytest.raises(ValueError, match="num_links"):
        link_rate(1.0, 1e-9, num_links=0)
    with pytest.raises(ValueError, match="positions"):
        channel_gains(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="delay bound"):
        min_power(1e5, 1e-9, num_links=1, delay_bound_s=0.0)
