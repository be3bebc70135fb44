"""Wireless channel model of the paper (Sec. III-B): peers in a disc, Rayleigh fading, OFDMA links, Lemma 1.

Peer ``i`` sends a payload of ``Q`` bits to each of its ``|u_i|`` neighbours at once, on an equal share
``W / |u_i|`` of its bandwidth (OFDMA). On link ``i -> j`` with power ``p`` and channel gain ``h`` the Shannon rate is
``(W / |u_i|) log2(1 + p h / sigma^2)`` and the delay is ``Q / rate`` (Eq. 8; this project counts bits, not
parameters). The least power meeting a delay bound ``Gamma`` is ``p* = sigma^2 / h (2^{Q |u_i| / (W Gamma)} - 1)``
(Lemma 1, Eq. 25); a peer is feasible when the sum of its links' powers stays within ``p_max``.

All quantities are SI: metres, hertz, watts, seconds, bits, joules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChannelParams",
    "place_peers",
    "channel_gains",
    "link_rate",
    "link_delay",
    "min_power",
    "peer_power",
    "is_feasible",
]


@dataclass(frozen=True)
class ChannelParams:
    """Physical constants of the wireless model; the paper gives none, so these are the project's documented defaults.

    - ``radius_m`` = 100 m: disc in which peers are placed (a campus-scale cell).
    - ``bandwidth_hz`` = 1 MHz: each peer's total bandwidth ``W``, split equally over its links (OFDMA).
    - ``noise_power_w`` = 1e-14 W (-110 dBm): noise power ``sigma^2`` on a link, thermal noise over 1 MHz
      (-174 dBm/Hz + 60 dB) plus a ~4 dB receiver noise figure.
    - ``p_max_w`` = 0.2 W (23 dBm): a peer's total transmit power budget (LTE/NR handset class).
    - ``delay_bound_s`` = 1 s: the per-round delay bound ``Gamma``.
    - ``path_loss_exponent`` = 2 (the paper's ``d^-2``) with ``reference_gain`` = 1e-3 (-30 dB at 1 m), so
      the mean gain is ``reference_gain * d^-2``; distances below ``min_distance_m`` = 1 m are clipped (far field).
    """

    radius_m: float = 100.0
    bandwidth_hz: float = 1e6
    noise_power_w: float = 1e-14
    p_max_w: float = 0.2
    delay_bound_s: float = 1.0
    path_loss_exponent: float = 2.0
    reference_gain: float = 1e-3
    min_distance_m: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "radius_m",
            "bandwidth_hz",
            "noise_power_w",
            "p_max_w",
            "delay_bound_s",
            "path_loss_exponent",
            "reference_gain",
            "min_distance_m",
        ):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"ChannelParams.{name} must be a positive finite number, got {value!r}")


DEFAULT_CHANNEL = ChannelParams()


def place_peers(n: int, *, radius: float = DEFAULT_CHANNEL.radius_m, seed: int = 0) -> np.ndarray:
    """Place ``n`` peers uniformly at random in a disc of ``radius`` metres centred on 0; returns an (n, 2) array.

    Uniform in area: the distance from the centre is ``radius * sqrt(U)``. The same seed gives the same placement.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    rng = np.random.default_rng(seed)
    r = radius * np.sqrt(rng.random(n))
    theta = 2.0 * np.pi * rng.random(n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def channel_gains(positions: np.ndarray, *, seed: int = 0, params: ChannelParams = DEFAULT_CHANNEL) -> np.ndarray:
    """Channel power gains ``h_ij = rho_ij * g0 * d_ij^-alpha`` between all pairs; returns a symmetric (n, n) array.

    ``rho_ij ~ Exp(1)`` is the Rayleigh fading power gain, drawn once per (unordered) pair from ``seed`` (a block
    fading channel, reciprocal). The diagonal is 0: a peer has no link to itself.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or not np.all(np.isfinite(pos)):
        raise ValueError(f"positions must be a finite (n, 2) array, got shape {pos.shape}")
    n = pos.shape[0]
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    d = np.maximum(d, params.min_distance_m)
    rng = np.random.default_rng(seed)
    fading = rng.exponential(1.0, size=(n, n))
    fading = np.triu(fading, 1)
    fading = fading + fading.T
    gains = fading * params.reference_gain * d ** (-params.path_loss_exponent)
    np.fill_diagonal(gains, 0.0)
    return gains


def _check_links(num_links: int) -> None:
    if int(num_links) != num_links or num_links < 1:
        raise ValueError(f"num_links must be a positive integer (a peer's number of links), got {num_links!r}")


def link_rate(
    power_w: float | np.ndarray,
    gain: float | np.ndarray,
    *,
    num_links: int,
    params: ChannelParams = DEFAULT_CHANNEL,
) -> float | np.ndarray:
    """Shannon rate in bit/s of a link on a ``1/num_links`` share of the sender's bandwidth (Eq. 8 denominator)."""
    _check_links(num_links)
    p = np.asarray(power_w, dtype=np.float64)
    h = np.asarray(gain, dtype=np.float64)
    if np.any(p < 0) or np.any(h < 0):
        raise ValueError("power and gain must be non-negative")
    rate = params.bandwidth_hz / num_links * np.log2(1.0 + p * h / params.noise_power_w)
    return float(rate) if rate.ndim == 0 else rate


def link_delay(
    q_bits: float,
    power_w: float | np.ndarray,
    gain: float | np.ndarray,
    *,
    num_links: int,
    params: ChannelParams = DEFAULT_CHANNEL,
) -> float | np.ndarray:
    """Seconds to send ``q_bits`` over a link (Eq. 8): ``Q / rate``; infinite when the rate is 0."""
    if q_bits < 0:
        raise ValueError(f"q_bits must be non-negative, got {q_bits}")
    rate = np.asarray(link_rate(power_w, gain, num_links=num_links, params=params))
    with np.errstate(divide="ignore", invalid="ignore"):
        delay = np.where(rate > 0, q_bits / np.where(rate > 0, rate, 1.0), np.inf)
    delay = np.where(q_bits == 0, 0.0, delay)
    return float(delay) if delay.ndim == 0 else delay


def min_power(
    q_bits: float,
    gain: float | np.ndarray,
    *,
    num_links: int,
    params: ChannelParams = DEFAULT_CHANNEL,
    delay_bound_s: float | None = None,
) -> float | np.ndarray:
    """Least power in W meeting the delay bound on a link (Lemma 1, Eq. 25): ``sigma^2/h (2^{Q |u|/(W Gamma)} - 1)``.

    ``delay_bound_s`` defaults to ``params.delay_bound_s``. A zero gain or an overflowing exponent gives ``inf``.
    """
    _check_links(num_links)
    gamma = params.delay_bound_s if delay_bound_s is None else delay_bound_s
    if not gamma > 0:
        raise ValueError(f"delay bound must be positive, got {gamma}")
    if q_bits < 0:
        raise ValueError(f"q_bits must be non-negative, got {q_bits}")
    h = np.asarray(gain, dtype=np.float64)
    if np.any(h < 0):
        raise ValueError("gain must be non-negative")
    exponent = q_bits * num_links / (params.bandwidth_hz * gamma)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        snr = np.expm1(exponent * np.log(2.0))
        power = np.where(h > 0, params.noise_power_w / np.where(h > 0, h, 1.0) * snr, np.inf)
    power = np.where(q_bits == 0, 0.0, power)
    return float(power) if power.ndim == 0 else power


def peer_power(
    q_bits: float,
    gains: np.ndarray,
    *,
    params: ChannelParams = DEFAULT_CHANNEL,
    delay_bound_s: float | None = None,
) -> float:
    """Total least power in W for one peer to send ``q_bits`` to each of its links within the delay bound.

    ``gains`` holds the gains of the peer's links, one per neighbour; ``|u_i| = len(gains)``. No links cost 0 W.
    """
    g = np.asarray(gains, dtype=np.float64).reshape(-1)
    if g.size == 0:
        return 0.0
    powers = min_power(q_bits, g, num_links=g.size, params=params, delay_bound_s=delay_bound_s)
    return float(np.sum(powers))


def is_feasible(
    q_bits: float,
    gains: np.ndarray,
    *,
    params: ChannelParams = DEFAULT_CHANNEL,
    delay_bound_s: float | None = None,
) -> bool:
    """Whether one peer can send ``q_bits`` to each of its links within the delay bound using at most ``p_max``."""
    return peer_power(q_bits, gains, params=params, delay_bound_s=delay_bound_s) <= params.p_max_w
