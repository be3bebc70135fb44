"""How a peer combines what it received, and whose adapters its forward holds: two tables of pure functions.

:data:`AGGREGATIONS` maps a spec's ``aggregation`` to a function of one round's :class:`Group` (the peer's own
trained update and the neighbours' it received, each with its round-0 structure) that returns the parts the peer's
view takes from this round, by member index. :data:`FORWARD_RULES` maps a spec's ``forward`` to the members whose
adapters are active while the peer trains, and says whether the parts of members skipped this round stay in the
view. A new rule is one function and one entry here; the peer program (:mod:`sorlora.protocol.program`) only looks
them up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sorlora_gossip.aggregation import fedavg, masked_average_updates, member_views
from sorlora_gossip.dense import DenseUpdate

__all__ = ["AGGREGATIONS", "FORWARD_RULES", "ForwardRule", "Group", "cluster_expert"]


@dataclass(frozen=True)
class Group:
    """One peer's round: its own update and the received ones (member index -> payload with structure)."""

    me: int
    own: Any
    received: Mapping[int, Any]
    weights: Mapping[int, float]  # member index -> its weight (training-set size)
    cluster: Sequence[int]  # the member indices of the peer's cluster
    forward: str  # the spec's forward rule
    shared_projection: bool  # every member's A is the same matrix (LoRI): parts must be disjoint

    @property
    def members(self) -> dict[int, Any]:
        return {self.me: self.own, **self.received}

    @property
    def order(self) -> list[int]:
        return sorted(self.members)

    def weight_list(self) -> list[float]:
        return [float(self.weights[q]) for q in self.order]


def _none(group: Group) -> dict[int, Any]:
    """No exchange: the own update as trained."""
    return {group.me: group.own}


def _fedavg(group: Group) -> dict[int, Any]:
    """Dense LoRA: the weighted average of every received state (A and B) and the own one."""
    members = group.members
    avg = fedavg([members[q].values for q in group.order], group.weight_list())
    return {group.me: DenseUpdate(values=avg, metadata=group.own.metadata)}


def _kept(group: Group) -> list[int]:
    """The members whose parts the view holds: its own only, or the cluster members that sent this round."""
    if group.forward == "own":
        return [group.me]
    return [q for q in sorted(group.cluster) if q in group.members]


def _masked(group: Group) -> dict[int, Any]:
    """The masked average B̄ of the group on each kept member's mask (method.md §3).

    ``forward="neighbours"`` (LoRI): the own part first, then each received neighbour's part of the average; with a
    shared A an entry held by several masks goes to the first part only, so the view's forward is the average on
    the union of the group's masks (a neighbour skipped this round is not in it).
    """
    members = group.members
    b_bar = masked_average_updates([members[q] for q in group.order], group.weight_list())
    if group.forward == "neighbours":
        keep = [group.me, *(q for q in group.order if q != group.me)]
        parts = member_views(b_bar, [members[q] for q in keep], exclusive=group.shared_projection)
        return dict(zip(keep, parts))
    keep = _kept(group)
    return dict(zip(keep, member_views(b_bar, [members[q] for q in keep])))


def _union(group: Group) -> dict[int, Any]:
    """Each kept member's own part as it sent it: no entry is averaged at a collision."""
    members = group.members
    return {q: members[q] for q in _kept(group)}


AGGREGATIONS: dict[str, Callable[[Group], dict[int, Any]]] = {
    "none": _none,
    "fedavg": _fedavg,
    "masked": _masked,
    "union": _union,
}


@dataclass(frozen=True)
class ForwardRule:
    """Whose adapters a peer's forward holds while it trains, and whether its view keeps earlier parts."""

    active: Callable[[str, Sequence[str], Sequence[str]], list[str]]  # (peer, its cluster, its neighbours) -> peers
    keeps_view: bool  # a member skipped this round keeps its earlier part in the view


FORWARD_RULES: dict[str, ForwardRule] = {
    "own": ForwardRule(lambda peer, cluster, neighbours: [peer], keeps_view=False),
    "cluster": ForwardRule(lambda peer, cluster, neighbours: list(cluster), keeps_view=True),
    "neighbours": ForwardRule(lambda peer, cluster, neighbours: [peer, *neighbours], keeps_view=False),
}


def cluster_expert(updates: Sequence[Any], weights: Sequence[float]) -> list[Any]:
    """Another cluster's expert as the inter-cluster exchange forms it: its members' masked average B̄ on each
    member's mask (never averaged into the peer's own parts)."""
    return member_views(masked_average_updates(updates, weights), updates)
