"""How a peer combines what it received, and whose adapters its forward holds: two tables of pure functions.

:data:`AGGREGATIONS` maps a spec's ``aggregation`` to a function of one round's :class:`Group` (the peer's own
trained update and the neighbours' it received, each with its round-0 structure) that returns a :class:`Combined`:
the parts the peer's view takes from this round, by member index, what the robust strategy decided about every
member, and the new reference (the dense B̄ the next round's updates are measured from). :data:`FORWARD_RULES`
maps a spec's ``forward`` to the members whose adapters are active while the peer trains, and says whether the
parts of members skipped this round stay in the view. A new rule is one function and one entry here; the peer
program (:mod:`sorlora.protocol.program`) only looks them up.

Every average goes through :func:`sorlora_gossip.robust.aggregate_never_die` under the terms' ``aggregation``
strategy (``mean``: the plain weighted average of before; ``clipped`` by default): the raw registered weights go in
unconverted (a weight that overflows a float is a recorded rejection, never an ``OverflowError``), a member rejected
by the strategy contributes nothing and gets no part in the view, and the result is always finite.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sorlora_gossip.aggregation import member_views
from sorlora_gossip.dense import DenseUpdate
from sorlora_gossip.robust import Aggregate, aggregate_never_die, full_masks

__all__ = ["AGGREGATIONS", "FORWARD_RULES", "Combined", "ForwardRule", "Group", "cluster_expert"]


@dataclass(frozen=True)
class Group:
    """One peer's round: its own update and the received ones (member index -> payload with structure).

    ``strategy``: the robust strategy's name (:data:`sorlora_gossip.robust.STRATEGIES`); ``weights`` are the raw
    registered training-set sizes (never converted here); ``reference``: the peer's previous B̄ (dense per layer,
    None before any), the point the strategy measures updates from; ``names`` name the members in the records;
    ``check``: an optional test of the candidate parts (e.g. "the loss of this view is finite"), whose failure drops
    the most suspicious neighbour and re-aggregates.
    """

    me: int
    own: Any
    received: Mapping[int, Any]
    weights: Mapping[int, object]  # member index -> its registered weight (training-set size), raw
    cluster: Sequence[int]  # the member indices of the peer's cluster
    forward: str  # the spec's forward rule
    shared_projection: bool  # every member's A is the same matrix (LoRI): parts must be disjoint
    strategy: str = "mean"
    round: int | None = None
    reference: Mapping[str, torch.Tensor] | None = None
    names: Mapping[int, Hashable] | None = None
    check: Callable[[dict[int, Any]], bool] | None = None

    @property
    def members(self) -> dict[int, Any]:
        return {self.me: self.own, **self.received}

    @property
    def order(self) -> list[int]:
        return sorted(self.members)

    def weight_list(self) -> list[object]:
        return [self.weights[q] for q in self.order]

    def name(self, q: int) -> Hashable:
        return q if self.names is None else self.names.get(q, q)


@dataclass
class Combined:
    """A rule's result: the view's parts of this round, the strategy's decisions (JSON-ready dicts, with the peer,
    round, layer, action and reason), the members rejected, and the dense B̄ to measure the next round from."""

    parts: dict[int, Any]
    decisions: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    reference: dict[str, torch.Tensor] | None = None


def _robust(group: Group, order: Sequence[int], values, masks, to_parts) -> tuple[Aggregate, list[int]]:
    """``aggregate_never_die`` over ``order`` (the receiver first among equals: ``group.me``)."""
    check = None
    if group.check is not None:
        check = lambda b_bar: bool(group.check(to_parts(b_bar)))  # noqa: E731
    agg = aggregate_never_die(
        values, masks, [group.weights[q] for q in order], strategy=group.strategy,
        peers=[group.name(q) for q in order], own=order.index(group.me), round=group.round,
        reference=group.reference, check=check,
    )  # fmt: skip
    used = sorted(order[i] for i in agg.used)
    return agg, used


def _records(group: Group, agg: Aggregate, order: Sequence[int], used: Sequence[int]) -> Combined:
    rejected = [q for q in order if q not in used]
    return Combined(parts={}, decisions=[d.as_dict() for d in agg.decisions], rejected=rejected,
                    reference={k: v.detach().clone() for k, v in agg.values.items()})  # fmt: skip


def _none(group: Group) -> Combined:
    """No exchange: the own update as trained."""
    return Combined(parts={group.me: group.own})


def _fedavg(group: Group) -> Combined:
    """Dense LoRA: the robust weighted average of every received state (A and B, every tensor a fully held layer)
    and the own one."""
    members, order = group.members, group.order
    values = [members[q].values for q in order]
    masks = [full_masks(v) for v in values]

    def to_parts(avg):
        return {group.me: DenseUpdate(values=dict(avg), metadata=group.own.metadata)}

    agg, used = _robust(group, order, values, masks, to_parts)
    out = _records(group, agg, order, used)
    out.parts = to_parts(agg.values)
    return out


def _kept(group: Group) -> list[int]:
    """The members whose parts the view holds: its own only, or the cluster members that sent this round."""
    if group.forward == "own":
        return [group.me]
    return [q for q in sorted(group.cluster) if q in group.members]


def _masked_parts(group: Group, b_bar, used: Sequence[int]) -> dict[int, Any]:
    members = group.members
    if group.forward == "neighbours":
        keep = [group.me, *(q for q in group.order if q != group.me and q in used)]
        parts = member_views(b_bar, [members[q] for q in keep], exclusive=group.shared_projection)
        return dict(zip(keep, parts))
    keep = [q for q in _kept(group) if q in used or q == group.me]
    return dict(zip(keep, member_views(b_bar, [members[q] for q in keep])))


def _masked(group: Group) -> Combined:
    """The robust masked average B̄ of the group on each kept member's mask (method.md §3); a rejected member
    gets no part.

    ``forward="neighbours"`` (LoRI): the own part first, then each received neighbour's part of the average; with a
    shared A an entry held by several masks goes to the first part only, so the view's forward is the average on
    the union of the group's masks (a neighbour skipped or rejected this round is not in it).
    """
    members, order = group.members, group.order
    values = [members[q].values for q in order]
    masks = [members[q].masks for q in order]
    agg, used = _robust(group, order, values, masks, lambda b_bar: _masked_parts(group, b_bar, order))
    out = _records(group, agg, order, used)
    out.parts = _masked_parts(group, agg.values, used)
    return out


def _union(group: Group) -> Combined:
    """Each kept member's own part as it sent it: no entry is averaged at a collision; the strategy still screens
    the members (a rejected one gets no part)."""
    members, order = group.members, group.order
    agg, used = _robust(group, order, [members[q].values for q in order], [members[q].masks for q in order],
                        lambda b_bar: {q: members[q] for q in _kept(group)})  # fmt: skip
    out = _records(group, agg, order, used)
    out.parts = {q: members[q] for q in _kept(group) if q in used or q == group.me}
    return out


AGGREGATIONS: dict[str, Callable[[Group], Combined]] = {
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


def cluster_expert(
    updates: Sequence[Any],
    weights: Sequence[object],
    *,
    strategy: str = "mean",
    names: Sequence[Hashable] | None = None,
    round: int | None = None,  # noqa: A002 - the record's field
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Another cluster's expert as the inter-cluster exchange forms it: its members' robust masked average B̄ on
    each kept member's mask (never averaged into the peer's own parts), and the strategy's decisions.

    No member of another cluster is trusted, so the strategy's anchor (its "own", never clipped) is the member of
    median update norm (the lower median; ties by order): a single outlier is never the anchor among 3 or more.
    Rejected members get no part (the expert is the kept members' parts, in order).
    """
    names = list(names) if names is not None else list(range(len(updates)))
    norms = []
    for u in updates:
        try:
            n = float(sum(float(v.double().norm()) ** 2 for v in u.values.values()))
        except (AttributeError, TypeError, RuntimeError):
            n = float("inf")
        norms.append(n if n == n else float("inf"))  # NaN sorts last
    ranked = sorted(range(len(updates)), key=lambda j: (norms[j], j))
    anchor = ranked[(len(ranked) - 1) // 2]
    agg = aggregate_never_die([u.values for u in updates], [u.masks for u in updates], list(weights),
                              strategy=strategy, peers=names, own=anchor, round=round)  # fmt: skip
    used = sorted(agg.used)
    parts = member_views(agg.values, [updates[j] for j in used])
    full: list[Any] = [None] * len(updates)
    for j, part in zip(used, parts):
        full[j] = part
    return full, [d.as_dict() for d in agg.decisions]
