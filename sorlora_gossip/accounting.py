"""Communication accounting: parameters updated and sent, bytes per link, delay and energy per round and in total.

Every round each peer sends its payload to each of its neighbours in the topology, all links at once (OFDMA: a
peer's bandwidth is split over its links, Eq. 8). Bytes are real payload sizes: ``len(update.to_bytes())`` for
SO-LoRA (``peft_sorlora.update_stats``), the safetensors serialisation of the adapter state dict for dense LoRA;
the wire carries ``8 * bytes`` bits. Power per link follows ``power_policy``:

- ``"min_power"``: Lemma 1 (Eq. 25) -- the least power meeting the delay bound Gamma; every link takes exactly
  Gamma, energy is ``p* Gamma``, and a peer is infeasible when its links' powers sum above ``p_max``.
- ``"full_power"``: each peer spreads ``p_max`` equally over its links; delay is ``Q / rate``, energy ``p t``, and
  a link is infeasible when its delay exceeds Gamma.

The round's delay is the slowest link (links run in parallel); energy is summed over links.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import networkx as nx
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from peft_sorlora.exchange import UpdateStats, update_stats
from sorlora_gossip.wireless import DEFAULT_CHANNEL, ChannelParams, channel_gains, link_delay, min_power

if TYPE_CHECKING:
    from peft_sorlora import SparseUpdate

__all__ = [
    "LinkStats",
    "CommStats",
    "PowerPolicy",
    "dense_payload_stats",
    "round_stats",
    "solora_round_stats",
    "lora_round_stats",
    "total_stats",
]

PowerPolicy = Literal["min_power", "full_power"]


@dataclass(frozen=True)
class LinkStats:
    """Cost of one directed link (sender -> receiver), summed over the rounds counted."""

    params: int
    bytes: int
    delay_s: float
    energy_j: float

    def __add__(self, other: LinkStats) -> LinkStats:
        return LinkStats(
            self.params + other.params,
            self.bytes + other.bytes,
            self.delay_s + other.delay_s,
            self.energy_j + other.energy_j,
        )


@dataclass(frozen=True)
class CommStats:
    """Communication cost of one method over ``rounds`` rounds (one round from ``round_stats``; add to accumulate).

    ``params_updated``: trainable adapter parameters summed over peers (SO-LoRA: the masked B entries; dense LoRA: A
    and B) in one round (the largest round when rounds are added). ``params_sent``/``bytes_sent``: over all links and rounds; ``overhead_bytes`` is the part of
    ``bytes_sent`` beyond the raw values (safetensors headers, round-0 masks). ``delay_s``: sum of the rounds'
    delays (slowest link of each round); ``energy_j``: sum of ``p t`` over links and rounds.
    """

    method: str
    rounds: int
    params_updated: int
    params_sent: int
    bytes_sent: int
    overhead_bytes: int
    delay_s: float
    energy_j: float
    feasible: bool
    links: dict[tuple[Hashable, Hashable], LinkStats]

    @property
    def num_links(self) -> int:
        """Directed links used per round."""
        return len(self.links)

    @property
    def params_per_round(self) -> float:
        return self.params_sent / self.rounds

    @property
    def bytes_per_round(self) -> float:
        return self.bytes_sent / self.rounds

    @property
    def delay_per_round_s(self) -> float:
        return self.delay_s / self.rounds

    @property
    def energy_per_round_j(self) -> float:
        return self.energy_j / self.rounds

    def __add__(self, other: CommStats) -> CommStats:
        """Accumulate two stretches of rounds of the same method."""
        if other.method != self.method:
            raise ValueError(f"cannot add stats of {other.method!r} to stats of {self.method!r}")
        links = dict(self.links)
        for key, link in other.links.items():
            links[key] = links[key] + link if key in links else link
        return CommStats(
            method=self.method,
            rounds=self.rounds + other.rounds,
            params_updated=max(self.params_updated, other.params_updated),
            params_sent=self.params_sent + other.params_sent,
            bytes_sent=self.bytes_sent + other.bytes_sent,
            overhead_bytes=self.overhead_bytes + other.overhead_bytes,
            delay_s=self.delay_s + other.delay_s,
            energy_j=self.energy_j + other.energy_j,
            feasible=self.feasible and other.feasible,
            links=links,
        )

    def as_dict(self) -> dict[str, float | int | str | bool]:
        """A JSON-ready summary (totals and per-round means, without the per-link detail)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "links"}
        out.update(
            num_links=self.num_links,
            params_per_round=self.params_per_round,
            bytes_per_round=self.bytes_per_round,
            delay_per_round_s=self.delay_per_round_s,
            energy_per_round_j=self.energy_per_round_j,
        )
        return out


def dense_payload_stats(state_dict: Mapping[str, torch.Tensor]) -> UpdateStats:
    """Cost of sending a dense LoRA adapter (A and B): all values, bytes of its safetensors serialisation."""
    if not state_dict:
        raise ValueError("state dict is empty")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    params = sum(int(v.numel()) for v in tensors.values())
    value_bytes = sum(int(v.numel()) * v.element_size() for v in tensors.values())
    return UpdateStats(
        params_updated=params, params_transmitted=params, bytes=len(save_safetensors(tensors)), value_bytes=value_bytes
    )


def _gains_of(g: nx.Graph, gains: np.ndarray | None, channel: ChannelParams, seed: int) -> np.ndarray:
    """The gain matrix: given, stored by ``cluster_topology``, or drawn from the nodes' ``pos``."""
    if gains is None:
        gains = g.graph.get("gains")
    if gains is None:
        missing = [v for v in g if "pos" not in g.nodes[v]]
        if missing:
            raise ValueError(f"no gains given and nodes {missing} have no 'pos' to derive them from")
        gains = channel_gains(
            np.array([g.nodes[v]["pos"] for v in range(g.number_of_nodes())]), seed=seed, params=channel
        )
    gains = np.asarray(gains, dtype=np.float64)
    n = g.number_of_nodes()
    if gains.shape != (n, n) or set(g.nodes) != set(range(n)):
        raise ValueError(f"need nodes 0..{n - 1} and an ({n}, {n}) gain matrix, got {gains.shape}")
    return gains


def round_stats(
    g: nx.Graph,
    payloads: Mapping[Hashable, UpdateStats],
    *,
    method: str,
    gains: np.ndarray | None = None,
    channel: ChannelParams | None = None,
    power_policy: PowerPolicy = "min_power",
    seed: int = 0,
) -> CommStats:
    """Cost of one round in which every peer sends its payload (``payloads[v]``) to each of its neighbours in ``g``.

    ``gains`` defaults to the graph's ``gains`` attribute, else is drawn from node ``pos`` with ``seed``; ``channel``
    defaults to the graph's ``channel`` attribute, else ``ChannelParams()``.
    """
    if power_policy not in ("min_power", "full_power"):
        raise ValueError(f"power_policy must be 'min_power' or 'full_power', got {power_policy!r}")
    channel = channel or g.graph.get("channel") or DEFAULT_CHANNEL
    missing = [v for v in g if v not in payloads]
    if missing:
        raise ValueError(f"no payload for peers {missing}")
    h = _gains_of(g, gains, channel, seed) if g.number_of_edges() else None
    links: dict[tuple[Hashable, Hashable], LinkStats] = {}
    feasible = True
    round_delay = 0.0
    overhead = 0
    for i in g:
        targets = sorted(g.neighbors(i))
        if not targets:
            continue
        cost = payloads[i]
        q_bits = 8.0 * cost.bytes
        link_gains = h[i, targets]
        if power_policy == "min_power":
            powers = np.atleast_1d(min_power(q_bits, link_gains, num_links=len(targets), params=channel))
            delays = np.where(np.isfinite(powers), channel.delay_bound_s if q_bits > 0 else 0.0, np.inf)
            feasible = feasible and float(powers.sum()) <= channel.p_max_w
        else:
            powers = np.full(len(targets), channel.p_max_w / len(targets))
            delays = np.atleast_1d(link_delay(q_bits, powers, link_gains, num_links=len(targets), params=channel))
            feasible = feasible and bool(np.all(delays <= channel.delay_bound_s))
        for j, p, t in zip(targets, powers, delays):
            links[(i, j)] = LinkStats(cost.params_transmitted, cost.bytes, float(t), float(p * t))
        round_delay = max(round_delay, float(delays.max()))
        overhead += cost.overhead_bytes * len(targets)
    return CommStats(
        method=method,
        rounds=1,
        params_updated=sum(payloads[v].params_updated for v in g),
        params_sent=sum(link.params for link in links.values()),
        bytes_sent=sum(link.bytes for link in links.values()),
        overhead_bytes=overhead,
        delay_s=round_delay,
        energy_j=float(sum(link.energy_j for link in links.values())),
        feasible=feasible,
        links=links,
    )


def solora_round_stats(
    g: nx.Graph,
    updates: Mapping[Hashable, SparseUpdate],
    *,
    gains: np.ndarray | None = None,
    channel: ChannelParams | None = None,
    power_policy: PowerPolicy = "min_power",
    seed: int = 0,
) -> CommStats:
    """One SO-LoRA round: each peer sends its ``SparseUpdate`` (bytes = ``len(update.to_bytes())``) to its neighbours."""
    payloads = {v: update_stats(u) for v, u in updates.items()}
    return round_stats(g, payloads, method="solora", gains=gains, channel=channel, power_policy=power_policy, seed=seed)


def lora_round_stats(
    g: nx.Graph,
    state_dicts: Mapping[Hashable, Mapping[str, torch.Tensor]],
    *,
    gains: np.ndarray | None = None,
    channel: ChannelParams | None = None,
    power_policy: PowerPolicy = "min_power",
    seed: int = 0,
) -> CommStats:
    """One dense LoRA round (DFL-LoRA): each peer sends its A and B state dict (safetensors) to its neighbours."""
    payloads = {v: dense_payload_stats(sd) for v, sd in state_dicts.items()}
    return round_stats(g, payloads, method="lora", gains=gains, channel=channel, power_policy=power_policy, seed=seed)


def total_stats(rounds: Iterable[CommStats]) -> CommStats:
    """Sum the per-round stats of one method into totals over all rounds."""
    it = iter(rounds)
    try:
        total = next(it)
    except StopIteration:
        raise ValueError("total_stats needs at least one round") from None
    for stats in it:
        total = total + stats
    return total
