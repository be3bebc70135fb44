"""Byzantine-robust aggregation: strategies over the masked average that one hostile member cannot stop or steer.

A strategy combines the members' B (dense or 1-D masked values, as in :func:`sorlora_gossip.aggregation.masked_average`)
into the shared B̄ and says what it did with every member: a list of :class:`Decision` records
``(peer, round, layer, action, reason)`` with ``action`` one of ``accepted``, ``clipped``, ``rejected``. A rejected
member never aborts the aggregation; the round goes on with the rest, and when every neighbour is rejected the
receiver keeps its own update. Strategies are small frozen dataclasses in one registry (:data:`STRATEGIES`, Flower
style: one name, one object; adding one is one :func:`register` call); :func:`get_strategy` returns one with its
parameters changed.

- ``mean``: today's masked average (:func:`~sorlora_gossip.aggregation.masked_average`), numbers unchanged; every
  member accepted. It raises on NaN/Inf values or unusable weights, as before.
- ``clipped`` (the default, :data:`DEFAULT_STRATEGY`): the masked average of checked contributions. The receiver
  (``own``) is trusted: it is never clipped or direction-checked, only dropped if its values are not finite. Per
  neighbour, in this order (the first failure rejects the whole member, with its reason):

  1. structure: the receiver's layers, bool masks of the receiver's shapes, values that fit the mask;
  2. values finite (no NaN/Inf, also after conversion to the computation dtype);
  3. weight (the self-declared data size): a number that converts to a finite positive float (an int such as
     ``10**400`` that overflows is rejected, never raised), at most ``max_weight`` (1e12) and at most
     ``absurd_weight`` (1000) × the median weight; kept weights are clamped to ``[median / weight_cap,
     median × weight_cap]`` (``weight_cap`` 4; a clamp is a ``clipped`` record with layer None). The receiver's own
     weight counts for the median; if it is unusable the median is used;
  4. mask density per layer at most ``density_factor`` (1.5) × the median density of the members (a dense mask
     where sparse ones are expected would be a holder of every entry);
  5. retreat (from the second round on, when there is a reference): the cosine between the member's update and
     the reference on the member's mask. Members of a learning collaboration agree on it (about 0 to 0.1: they
     grow B̄ or move across it), while a member sending its values with the sign flipped (``-B``, an update of
     about ``-2 reference``) or shrunk towards 0 lands far below (-0.6 to -0.8 measured). Against the members'
     median ``m`` (the receiver's counts), one below ``m - retreat`` (0.3) is rejected and one below
     ``m - retreat_tolerance`` (0.1) has its weight scaled linearly down to 0 at ``m - retreat`` (a ``clipped``
     record). Without it a flipped member clipped to the median norm still moved B̄ by about 0.4 of the honest
     round's step, every round in the same direction, since honest updates barely correlate and partly cancel;
     the check against the receiver's own update (below) cannot see it, as honest cosines are about 0 too;
  6. direction: the cosine between the member's update and the receiver's own, on the entries both masks hold
     (all layers together, at least ``min_overlap`` of them), must be at least ``cos_threshold`` (-0.5); with
     ``agreement`` (on), when the neighbours' median cosine ``med`` is at least ``min_agreement`` (0.1), a member
     whose cosine is below ``-anti_agreement × med`` (0.75) is rejected (a flipped sign lands near ``-med``) and one
     below ``med`` has its weight scaled by ``(cos + 0.75 med) / (1.75 med)`` (a ``clipped`` record): an honest
     member slightly anti-aligned by noise is down-weighted, not rejected;
  7. norm, per layer: the member's update norm is clipped to ``clip`` (1.0) × the median of the members' norms on
     that layer (the receiver's counts) — a ``clipped`` record naming the layer.

  "Update" is the member's B minus ``reference`` (the receiver's B̄ of the previous round; zeros when None, as at
  round 0 where B starts at 0), and B̄ = reference + the masked weighted average of the clipped updates. Entries
  that no kept member holds are the reference (0 without one), as in ``masked_average``.
- ``trimmed``: as ``clipped``, then every entry with at least ``min_holders`` (3) kept holders is the trimmed mean
  of their clipped values (``max(1, floor(beta × holders))`` cut from each end, ``beta`` 0.2; unweighted); entries
  with fewer holders keep the clipped weighted mean.
- ``median``: as ``trimmed`` with the coordinate-wise median over the holders.

:func:`aggregate_never_die` wraps any strategy: members whose values are not finite or whose weight is unusable are
dropped first; if the aggregate (or an optional ``check`` of it, e.g. "the validation loss is finite") still fails,
the neighbours behind it are dropped one at a time and the aggregation is recomputed, down to the receiver's own
update. It never returns NaN or Inf.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sorlora_gossip.aggregation import _dense, _promoted_dtype, masked_average

if TYPE_CHECKING:
    from peft_sorlora import SparseUpdate

__all__ = [
    "ACCEPTED",
    "CLIPPED",
    "REJECTED",
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "Aggregate",
    "Clipped",
    "Decision",
    "Mean",
    "Median",
    "Strategy",
    "Trimmed",
    "aggregate_never_die",
    "check_weight",
    "get_strategy",
    "register",
    "robust_fedavg",
    "full_masks",
    "robust_masked_average",
    "robust_masked_average_updates",
]

ACCEPTED, CLIPPED, REJECTED = "accepted", "clipped", "rejected"
DEFAULT_STRATEGY = "clipped"


@dataclass(frozen=True)
class Decision:
    """What a strategy did with one member: ``action`` is ``accepted``, ``clipped`` or ``rejected``; ``layer`` is
    None for the whole member (a rejection, a weight clamp, an acceptance) or the layer a norm clip applied to;
    ``round`` is whatever the caller passed (a round number or a revision)."""

    peer: Hashable
    round: int | str | None
    layer: str | None
    action: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record (the peer as given when it is a str or int, else its ``str``)."""
        peer = self.peer if isinstance(self.peer, (str, int)) else str(self.peer)
        return {"peer": peer, "round": self.round, "layer": self.layer, "action": self.action, "reason": self.reason}


@dataclass
class Aggregate:
    """A strategy's result: ``values`` (dense B̄ per layer, for ``member_views``), the ``decisions``, ``used`` (the
    indices of the members whose contributions entered) and ``weights`` (their effective normalised weights; 0 for
    a rejected member)."""

    values: dict[str, torch.Tensor]
    decisions: list[Decision]
    used: list[int]
    weights: list[float] = field(default_factory=list)

    @property
    def rejected(self) -> list[Hashable]:
        """Peers rejected (in decision order)."""
        return [d.peer for d in self.decisions if d.action == REJECTED]


# -- checks shared by the strategies ---------------------------------------------------------------------------


def _describe(x: object) -> str:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > 10**15:
        return f"an integer of {x.bit_length()} bits"  # never str() a huge int (it can raise, and it is long)
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def check_weight(x: object) -> tuple[float | None, str]:
    """``(weight, "")`` for a finite positive number, else ``(None, reason)``: never raises (``10**400`` included)."""
    if isinstance(x, bool):
        return None, f"weight {x!r} is not a number"
    try:
        w = float(x)  # type: ignore[arg-type]
    except OverflowError:
        return None, f"weight {_describe(x)} overflows a float"
    except (TypeError, ValueError):
        return None, f"weight {_describe(x)} is not a number"
    if not math.isfinite(w):
        return None, f"weight {w} is not finite"
    if w <= 0:
        return None, f"weight {w} is not positive"
    return w, ""


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all()) if t.is_floating_point() or t.is_complex() else True


@dataclass
class _Members:
    """The members after the checks: dense updates (B - reference, zero outside the mask) per kept member."""

    layers: list[str]
    ref: dict[str, torch.Tensor]
    masks: list[dict[str, torch.Tensor] | None]
    deltas: list[dict[str, torch.Tensor] | None]  # None: rejected
    weights: list[float]
    decisions: dict[int, list[Decision]]
    rejected: dict[int, Decision]

    @property
    def kept(self) -> list[int]:
        return [j for j, d in enumerate(self.deltas) if d is not None]


def _reject(m: _Members, j: int, peer: Hashable, rnd, reason: str, layer: str | None = None) -> None:
    m.rejected[j] = Decision(peer, rnd, layer, REJECTED, reason)
    m.deltas[j] = None
    m.weights[j] = 0.0


def _down_weight(m: _Members, j: int, peer: Hashable, rnd, trust: float, why: str) -> None:
    """Scale member ``j``'s weight by ``trust`` (a ``clipped`` record saying why)."""
    m.weights[j] *= trust
    m.decisions.setdefault(j, []).append(Decision(peer, rnd, None, CLIPPED, f"weight x{trust:.3f}: {why}"))


def _masked_cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                   layers: Sequence[str], min_overlap: int) -> tuple[float | None, int]:  # fmt: skip
    """The cosine of ``a`` and ``b`` over the entries ``masks`` holds, all ``layers`` together (float64), and how
    many entries that is; None when fewer than ``min_overlap``, either side is zero there, or it is not finite."""
    dot = na = nb = 0.0
    held = 0
    for layer in layers:
        mk = masks[layer]
        x, y = a[layer][mk].double(), b[layer][mk].double()
        held += int(mk.sum())
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    if held < min_overlap or na == 0 or nb == 0 or not math.isfinite(dot * na * nb):
        return None, held
    return dot / math.sqrt(na * nb), held


@dataclass(frozen=True)
class Strategy:
    """Base of every strategy: ``name`` (its registry key) and :meth:`aggregate`."""

    name: ClassVar[str] = ""

    def aggregate(
        self,
        updates: Sequence[Mapping[str, torch.Tensor]],
        masks: Sequence[Mapping[str, torch.Tensor] | None],
        weights: Sequence[object] | None = None,
        *,
        peers: Sequence[Hashable] | None = None,
        own: int = 0,
        round: int | str | None = None,  # noqa: A002 - the record's field
        reference: Mapping[str, torch.Tensor] | None = None,
    ) -> Aggregate:
        raise NotImplementedError


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to :data:`STRATEGIES` under its ``name`` (one place to add one)."""
    if not strategy.name:
        raise ValueError("a strategy needs a name")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(strategy: str | Strategy = DEFAULT_STRATEGY, **params: object) -> Strategy:
    """The registered strategy ``strategy`` (or the object itself) with ``params`` changed, e.g.
    ``get_strategy("clipped", clip=2.0)``; ValueError for an unknown name or parameter."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown aggregation strategy {strategy!r}; known: {sorted(STRATEGIES)}")
        strategy = STRATEGIES[strategy]
    if not params:
        return strategy
    known = {f.name for f in dataclasses.fields(strategy)}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"strategy {strategy.name!r} has no parameters {sorted(unknown)}; it has {sorted(known)}")
    return dataclasses.replace(strategy, **params)


@dataclass(frozen=True)
class Mean(Strategy):
    """Today's masked average, numbers unchanged (raises on NaN/Inf values or unusable weights, as before)."""

    name: ClassVar[str] = "mean"

    def aggregate(self, updates, masks, weights=None, *, peers=None, own=0, round=None, reference=None) -> Aggregate:
        peers = list(peers) if peers is not None else list(range(len(updates)))
        values = masked_average(updates, masks, weights)  # type: ignore[arg-type]
        w = [float(x) for x in weights] if weights is not None else [1.0] * len(updates)  # type: ignore[arg-type]
        top = max(w)
        return Aggregate(values, [Decision(p, round, None, ACCEPTED, "mean: no checks") for p in peers],
                         list(range(len(updates))), [x / top for x in w])  # fmt: skip


@dataclass(frozen=True)
class Clipped(Strategy):
    """Checked, weight-bounded, norm-clipped masked average (see the module docstring for every parameter)."""

    name: ClassVar[str] = "clipped"
    clip: float = 1.0
    weight_cap: float = 4.0
    max_weight: float = 1e12
    absurd_weight: float = 1e3
    density_factor: float = 1.5
    cos_threshold: float = -0.5
    min_overlap: int = 8
    agreement: bool = True
    min_agreement: float = 0.1
    anti_agreement: float = 0.75
    retreat: float = 0.3
    retreat_tolerance: float = 0.1

    # -- the checks ------------------------------------------------------------------------------------------

    def _members(self, updates, masks, weights, peers, own, rnd, reference) -> _Members:
        n = len(updates)
        if n == 0:
            raise ValueError("need at least one member to aggregate")
        if len(masks) != n:
            raise ValueError(f"got {len(masks)} masks for {n} updates")
        if weights is not None and len(weights) != n:
            raise ValueError(f"got {len(weights)} weights for {n} members")
        if not 0 <= own < n:
            raise ValueError(f"own index {own} is not one of the {n} members")
        own_masks = masks[own]
        if own_masks is None:
            raise ValueError("the receiver's own update carries no masks")
        layers = list(own_masks)
        m = _Members(layers, {}, [None] * n, [None] * n, [1.0] * n, {}, {})
        dense: list[dict[str, torch.Tensor] | None] = [None] * n
        for j in range(n):  # 1. structure
            try:
                dense[j] = self._structure(updates[j], masks[j], own_masks)
                m.masks[j] = dict(masks[j])  # type: ignore[arg-type]
            except ValueError as exc:
                if j == own:
                    raise
                _reject(m, j, peers[j], rnd, f"malformed update: {exc}")
        for layer in layers:
            dtype = _promoted_dtype([d[layer] for d in dense if d is not None])
            ref = reference.get(layer) if reference is not None else None
            if ref is None:
                ref = torch.zeros(own_masks[layer].shape, dtype=dtype)
            elif tuple(ref.shape) != tuple(own_masks[layer].shape) or not _finite(ref):
                raise ValueError(
                    f"reference of layer {layer!r} must be finite with shape {tuple(own_masks[layer].shape)}"
                )
            m.ref[layer] = ref.to(dtype)
        for j in range(n):  # 2. finite values
            d = dense[j]
            if d is None:
                continue
            for layer in layers:
                value = d[layer].to(m.ref[layer].dtype)
                if not _finite(value):
                    _reject(m, j, peers[j], rnd, f"non-finite values (NaN or Inf) on layer {layer!r}", layer)
                    break
                d[layer] = torch.where(m.masks[j][layer], value - m.ref[layer], torch.zeros((), dtype=value.dtype))
            else:
                m.deltas[j] = d
        self._weights(m, weights, peers, own, rnd)  # 3.
        self._density(m, peers, own, rnd)  # 4.
        self._retreat(m, peers, own, rnd)  # 5.
        self._direction(m, peers, own, rnd)  # 6.
        self._clip(m, peers, own, rnd)  # 7.
        return m

    @staticmethod
    def _structure(update, mask, own_masks) -> dict[str, torch.Tensor]:
        if mask is None:
            raise ValueError("no masks (no round-0 structure)")
        if set(mask) != set(own_masks) or set(update) != set(own_masks):
            raise ValueError(f"layers {sorted(update)[:4]} / masks {sorted(mask)[:4]} differ from the receiver's")
        out = {}
        for layer, own_mask in own_masks.items():
            mk, u = mask[layer], update[layer]
            if not isinstance(mk, torch.Tensor) or mk.dtype != torch.bool or mk.shape != own_mask.shape:
                raise ValueError(f"layer {layer!r}: mask must be bool {tuple(own_mask.shape)}")
            if not isinstance(u, torch.Tensor) or not u.is_floating_point():
                raise ValueError(f"layer {layer!r}: values must be a floating tensor")
            out[layer] = _dense(layer, u, mk)
        return out

    def _weights(self, m: _Members, weights, peers, own, rnd) -> None:
        n = len(m.deltas)
        raw: list[float | None] = [1.0] * n
        if weights is not None:
            for j in range(n):
                w, reason = check_weight(weights[j])
                if w is not None and w > self.max_weight:
                    w, reason = None, f"weight {w:.3g} is over the bound {self.max_weight:.3g}"
                raw[j] = w
                if w is None and j != own and m.deltas[j] is not None:
                    _reject(m, j, peers[j], rnd, reason)
        valid = [raw[j] for j in range(n) if raw[j] is not None and (j == own or m.deltas[j] is not None)]
        med = statistics.median(valid) if valid else 1.0
        for j in range(n):
            if m.deltas[j] is None and j != own:
                continue
            w = raw[j]
            if w is None:  # the receiver's own weight is unusable: the median stands in
                m.decisions.setdefault(j, []).append(Decision(peers[j], rnd, None, CLIPPED,
                                                              f"own weight unusable; the median {med:.6g} is used"))  # fmt: skip
                w = med
            elif j != own and w > self.absurd_weight * med:
                _reject(m, j, peers[j], rnd, f"weight {w:.3g} is {w / med:.3g}x the median {med:.6g}")
                continue
            lo, hi = med / self.weight_cap, med * self.weight_cap
            if not lo <= w <= hi:
                clamped = min(max(w, lo), hi)
                m.decisions.setdefault(j, []).append(Decision(peers[j], rnd, None, CLIPPED,
                    f"weight {w:.6g} clamped to {clamped:.6g} ({self.weight_cap:g}x bounds of the median {med:.6g})"))  # fmt: skip
                w = clamped
            m.weights[j] = w
        top = max(m.weights)
        m.weights = [w / top if top > 0 else 0.0 for w in m.weights]

    def _density(self, m: _Members, peers, own, rnd) -> None:
        for layer in m.layers:
            dens = {j: float(m.masks[j][layer].float().mean()) for j in m.kept}  # type: ignore[index]
            if own not in dens:
                dens[own] = float(m.masks[own][layer].float().mean())  # type: ignore[index]
            med = statistics.median(dens.values())
            for j in m.kept:
                if j != own and med > 0 and dens[j] > self.density_factor * med:
                    _reject(m, j, peers[j], rnd, f"mask density {dens[j]:.3f} on layer {layer!r} is over "
                                                 f"{self.density_factor:g}x the median {med:.3f}", layer)  # fmt: skip

    def _retreat(self, m: _Members, peers, own, rnd) -> None:
        """5. Retreat: a neighbour whose update points back along -reference much more than the members' median
        does (its B pulled towards 0 or past it: a flipped sign, a shrunk copy) is rejected, or down-weighted.
        In a learning collaboration the members' updates barely correlate with each other (different data and A;
        cosines about 0 +- 0.1, so the check against the receiver's update says nothing) but all of them agree on
        their angle with B̄ so far (about 0 to 0.1), while a flipped member's update, -B - reference, is about
        -2 reference (cosine -0.6 to -0.8). The median of the members' cosines (the receiver's counts) is the
        centre, so a collaboration whose updates all move away from an old B̄ is not penalised."""
        cosines: dict[int, float] = {}
        for j in m.kept:
            cos, _ = _masked_cosine(m.deltas[j], m.ref, m.masks[j], m.layers, self.min_overlap)  # type: ignore[arg-type]
            if cos is not None:  # none at round 0: no reference yet
                cosines[j] = cos
        if len(cosines) < 2 or own not in cosines:
            return
        med = statistics.median(cosines.values())
        lo, hi = self.retreat, self.retreat_tolerance
        for j, cos in cosines.items():
            if j == own or cos >= med - hi:
                continue
            if cos < med - lo:
                _reject(m, j, peers[j], rnd, f"retreat: its update's cosine {cos:.3f} with B̄ so far is over {lo:g} "
                                             f"below the members' median {med:.3f} (it pulls B̄ back)")  # fmt: skip
            else:
                _down_weight(
                    m,
                    j,
                    peers[j],
                    rnd,
                    (cos - med + lo) / (lo - hi),
                    f"retreat, its update's cosine {cos:.3f} with B̄ so far, the members' median {med:.3f}",
                )

    def _direction(self, m: _Members, peers, own, rnd) -> None:
        mine = m.deltas[own]
        if mine is None:
            return
        cosines: dict[int, tuple[float, int]] = {}
        for j in m.kept:
            if j == own:
                continue
            both = {layer: m.masks[j][layer] & m.masks[own][layer] for layer in m.layers}  # type: ignore[index]
            cos, shared = _masked_cosine(m.deltas[j], mine, both, m.layers, self.min_overlap)  # type: ignore[arg-type]
            if cos is None:
                continue
            if cos < self.cos_threshold:
                _reject(m, j, peers[j], rnd, f"direction: cosine {cos:.3f} against the receiver's update is below "
                                             f"{self.cos_threshold:g} ({shared} shared entries)")  # fmt: skip
            else:
                cosines[j] = (cos, shared)
        if not self.agreement or not cosines:
            return
        med = statistics.median(c for c, _ in cosines.values())
        if med < self.min_agreement:
            return  # the neighbours do not agree with the receiver enough for their cosines to say anything
        a = self.anti_agreement
        for j, (cos, shared) in cosines.items():
            # 1 at the median and above, falling linearly to 0 at -a x the median: an honest member whose cosine is
            # slightly negative (noise on a few hundred shared entries) is down-weighted, not rejected
            trust = min(max((cos + a * med) / ((1 + a) * med), 0.0), 1.0)
            if cos < -a * med:
                _reject(m, j, peers[j], rnd, f"direction: cosine {cos:.3f} against the receiver's update while the "
                                             f"neighbours' median is {med:.3f}, below -{a:g}x it ({shared} shared "
                                             "entries)")  # fmt: skip
            elif trust < 1.0 - 1e-6:
                _down_weight(
                    m,
                    j,
                    peers[j],
                    rnd,
                    trust,
                    f"cosine {cos:.3f} against the receiver's update, neighbours' median {med:.3f}",
                )

    def _clip(self, m: _Members, peers, own, rnd) -> None:
        for layer in m.layers:
            norms = {
                j: float(m.deltas[j][layer].double().norm())
                for j in m.kept  # type: ignore[index]
                if bool(m.masks[j][layer].any())
            }  # type: ignore[index]
            if not norms:
                continue
            bound = self.clip * statistics.median(norms.values())
            for j, norm in norms.items():
                if j == own or not math.isfinite(norm) or norm <= bound * (1 + 1e-6):
                    continue
                scale = bound / norm
                m.deltas[j][layer] = m.deltas[j][layer] * scale  # type: ignore[index]
                m.decisions.setdefault(j, []).append(Decision(peers[j], rnd, layer, CLIPPED,
                    f"norm {norm:.4g} clipped to {bound:.4g} ({self.clip:g}x the members' median)"))  # fmt: skip

    # -- the combination -------------------------------------------------------------------------------------

    def _combine(self, m: _Members, layer: str) -> torch.Tensor:
        """ref + the masked weighted mean of the kept members' (clipped) updates; the reference where none holds."""
        ref = m.ref[layer]
        zero = torch.zeros((), dtype=ref.dtype)
        holders = torch.zeros(ref.shape, dtype=ref.dtype)
        for j in m.kept:
            holders = holders + torch.where(m.masks[j][layer], torch.tensor(m.weights[j], dtype=ref.dtype), zero)  # type: ignore[index]
        safe = torch.where(holders > 0, holders, torch.ones((), dtype=ref.dtype))
        total = torch.zeros(ref.shape, dtype=ref.dtype)
        for j in m.kept:
            coef = torch.where(m.masks[j][layer], m.weights[j] / safe, zero)  # type: ignore[index]
            total = total + coef * m.deltas[j][layer]  # type: ignore[index]
        return ref + total

    def _entry_rule(self, m: _Members, layer: str, mean: torch.Tensor) -> torch.Tensor:
        return mean

    def aggregate(self, updates, masks, weights=None, *, peers=None, own=0, round=None, reference=None) -> Aggregate:
        peers = list(peers) if peers is not None else list(range(len(updates)))
        if len(peers) != len(updates):
            raise ValueError(f"got {len(peers)} peers for {len(updates)} updates")
        m = self._members(updates, masks, weights, peers, own, round, reference)
        values = {layer: self._entry_rule(m, layer, self._combine(m, layer)) for layer in m.layers}
        decisions: list[Decision] = []
        for j, peer in enumerate(peers):
            if j in m.rejected:
                decisions.append(m.rejected[j])
            elif m.decisions.get(j):
                decisions.extend(m.decisions[j])
            else:
                decisions.append(Decision(peer, round, None, ACCEPTED, "within bounds"))
        if not any(j != own for j in m.kept) and len(peers) > 1:
            decisions.append(Decision(peers[own], round, None, ACCEPTED, "every neighbour rejected: own update kept"))
        return Aggregate(values, decisions, m.kept, list(m.weights))


@dataclass(frozen=True)
class Trimmed(Clipped):
    """``clipped``, then the trimmed mean over the kept holders of every entry with at least ``min_holders``."""

    name: ClassVar[str] = "trimmed"
    beta: float = 0.2
    min_holders: int = 3

    def _stack(self, m: _Members, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kept = m.kept
        held = torch.stack([m.masks[j][layer] for j in kept])  # type: ignore[index]
        inf = torch.tensor(float("inf"), dtype=m.ref[layer].dtype)
        vals = torch.stack([torch.where(m.masks[j][layer], m.deltas[j][layer], inf) for j in kept])  # type: ignore[index]
        ordered, _ = torch.sort(vals, dim=0)  # the holders' values first, +inf (not held) last
        rank = torch.arange(len(kept)).view(-1, *([1] * (held.dim() - 1)))
        return ordered, held.sum(0), rank

    def _robust(self, ordered: torch.Tensor, count: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        cut = torch.clamp(torch.floor(self.beta * count.to(ordered.dtype)).to(count.dtype), min=1)
        keep = (rank >= cut) & (rank < count - cut)
        zero = torch.zeros((), dtype=ordered.dtype)
        total = torch.where(keep, ordered, zero).sum(0)
        return total / keep.sum(0).clamp(min=1).to(ordered.dtype)

    def _entry_rule(self, m: _Members, layer: str, mean: torch.Tensor) -> torch.Tensor:
        if len(m.kept) < self.min_holders:
            return mean
        ordered, count, rank = self._stack(m, layer)
        robust = m.ref[layer] + self._robust(ordered, count, rank)
        return torch.where(count >= self.min_holders, robust, mean)


@dataclass(frozen=True)
class Median(Trimmed):
    """``clipped``, then the coordinate-wise median over the kept holders of every entry with at least
    ``min_holders``."""

    name: ClassVar[str] = "median"

    def _robust(self, ordered: torch.Tensor, count: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        c = count.clamp(min=1)
        lo = torch.gather(ordered, 0, ((c - 1) // 2).unsqueeze(0)).squeeze(0)
        hi = torch.gather(ordered, 0, (c // 2).unsqueeze(0)).squeeze(0)
        both = torch.where(count > 0, (lo + hi) / 2, torch.zeros((), dtype=ordered.dtype))
        return torch.where(torch.isfinite(both), both, torch.zeros((), dtype=ordered.dtype))


for _strategy in (Mean(), Clipped(), Trimmed(), Median()):
    register(_strategy)


# -- entry points ----------------------------------------------------------------------------------------------


def robust_masked_average(
    updates: Sequence[Mapping[str, torch.Tensor]],
    masks: Sequence[Mapping[str, torch.Tensor] | None],
    weights: Sequence[object] | None = None,
    *,
    strategy: str | Strategy = DEFAULT_STRATEGY,
    peers: Sequence[Hashable] | None = None,
    own: int = 0,
    round: int | str | None = None,  # noqa: A002 - the record's field
    reference: Mapping[str, torch.Tensor] | None = None,
) -> Aggregate:
    """``masked_average`` under ``strategy`` (a registered name or a :class:`Strategy`): B̄ and the decisions.

    ``own`` is the receiver's index (trusted; its masks define the layers); ``peers`` name the members in the
    records (indices when None); ``round`` is copied into them; ``reference`` is the receiver's previous B̄ (dense
    per layer), the point updates are measured from.
    """
    return get_strategy(strategy).aggregate(updates, masks, weights, peers=peers, own=own, round=round,
                                            reference=reference)  # fmt: skip


def _masks_of(updates: Sequence[SparseUpdate], structure) -> list[dict[str, torch.Tensor] | None]:
    stored = list(structure) if structure is not None else [None] * len(updates)
    if len(stored) != len(updates):
        raise ValueError(f"got {len(stored)} structure entries for {len(updates)} updates")
    out = []
    for u, s in zip(updates, stored):
        src = u if u.has_structure else s
        out.append(src.masks if src is not None and src.has_structure else None)
    return out


def robust_masked_average_updates(
    updates: Sequence[SparseUpdate],
    weights: Sequence[object] | None = None,
    *,
    structure: Sequence[SparseUpdate | None] | None = None,
    strategy: str | Strategy = DEFAULT_STRATEGY,
    peers: Sequence[Hashable] | None = None,
    own: int = 0,
    round: int | str | None = None,  # noqa: A002
    reference: Mapping[str, torch.Tensor] | None = None,
) -> Aggregate:
    """:func:`robust_masked_average` over ``SparseUpdate``s (value-only ones take their masks from ``structure``,
    as in ``masked_average_updates``; a member with no masks at all is rejected, not raised)."""
    masks = _masks_of(updates, structure)
    return robust_masked_average([u.values for u in updates], masks, weights, strategy=strategy, peers=peers,
                                 own=own, round=round, reference=reference)  # fmt: skip


def full_masks(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dense state as a sparse member that holds every entry: an all-true mask per tensor (dense LoRA's FedAvg
    as a masked average)."""
    return {k: torch.ones(t.shape, dtype=torch.bool) for k, t in state.items()}


def robust_fedavg(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[object] | None = None,
    *,
    strategy: str | Strategy = DEFAULT_STRATEGY,
    peers: Sequence[Hashable] | None = None,
    own: int = 0,
    round: int | str | None = None,  # noqa: A002
    reference: Mapping[str, torch.Tensor] | None = None,
) -> Aggregate:
    """Dense LoRA FedAvg (A and B alike) under ``strategy``: every tensor is a layer with a full mask. With
    ``mean`` the numbers are ``fedavg``'s up to rounding (the same weighted mean)."""
    full = []
    for sd in state_dicts:
        try:
            full.append(full_masks(sd))
        except AttributeError:
            full.append(None)
    return robust_masked_average(state_dicts, full, weights, strategy=strategy, peers=peers, own=own, round=round,
                                 reference=reference)  # fmt: skip


def _bad_members(updates, masks, weights, own) -> dict[int, str]:
    """Members that no strategy can use: values not finite, no masks, unusable weight (the receiver excepted)."""
    bad: dict[int, str] = {}
    for j, (u, mk) in enumerate(zip(updates, masks)):
        if j == own:
            continue
        if mk is None:
            bad[j] = "no masks (no round-0 structure)"
            continue
        if weights is not None:
            w, reason = check_weight(weights[j])
            if w is None:
                bad[j] = reason
                continue
        for layer, v in u.items():
            if isinstance(v, torch.Tensor) and not _finite(v):
                bad[j] = f"non-finite values (NaN or Inf) on layer {layer!r}"
                break
    return bad


def aggregate_never_die(
    updates: Sequence[Mapping[str, torch.Tensor]],
    masks: Sequence[Mapping[str, torch.Tensor] | None],
    weights: Sequence[object] | None = None,
    *,
    strategy: str | Strategy = DEFAULT_STRATEGY,
    peers: Sequence[Hashable] | None = None,
    own: int = 0,
    round: int | str | None = None,  # noqa: A002
    reference: Mapping[str, torch.Tensor] | None = None,
    check: Callable[[dict[str, torch.Tensor]], bool] | None = None,
) -> Aggregate:
    """Drop, never die: ``strategy`` over the members, dropping the offending ones until the aggregate is finite
    and ``check(values)`` (when given, e.g. "the validation loss of this view is finite") holds.

    First the members with non-finite values, no masks or an unusable weight are dropped (so even ``mean`` runs).
    Then, while the aggregate has a non-finite entry or fails ``check``, one neighbour is dropped and the aggregate
    recomputed: a holder of a non-finite entry first, else the one with the largest absolute value. With only the
    receiver left, its own update (its values on its mask, the reference or 0 elsewhere) is returned even if
    ``check`` still fails (recorded); if its own values are not finite, the reference (or 0) is. Every drop is a
    ``rejected`` record; the returned values are always finite.
    """
    n = len(updates)
    peers = list(peers) if peers is not None else list(range(n))
    strat = get_strategy(strategy)
    dropped: dict[int, str] = _bad_members(updates, masks, weights, own)
    while True:
        alive = [j for j in range(n) if j not in dropped]
        sub_own = alive.index(own)
        try:
            result = strat.aggregate([updates[j] for j in alive], [masks[j] for j in alive],
                                     None if weights is None else [weights[j] for j in alive],
                                     peers=[peers[j] for j in alive], own=sub_own, round=round,
                                     reference=reference)  # fmt: skip
            result.used = [alive[i] for i in result.used]
            bad_entries = {k: ~torch.isfinite(v) for k, v in result.values.items() if not _finite(v)}
            ok = not bad_entries and (check is None or bool(check(result.values)))
            failure = "the aggregate has non-finite entries" if bad_entries else "the check of the aggregate failed"
        except (ValueError, OverflowError) as exc:  # e.g. mean over a malformed member
            if len(alive) == 1:
                raise
            result, ok, bad_entries, failure = None, False, {}, f"aggregation failed ({exc})"
        if ok or len(alive) == 1:
            break
        candidates = [j for j in alive if j != own]
        culprit = max(candidates, key=lambda j: _suspicion(updates[j], masks[j], bad_entries))
        dropped[culprit] = f"dropped and the round re-aggregated without it: {failure}"
    records = [Decision(peers[j], round, None, REJECTED, reason) for j, reason in sorted(dropped.items())]
    if result is None or not all(_finite(v) for v in result.values.values()):
        values = _own_only(updates[own], masks[own], reference)
        result = Aggregate(values, [], [own] if values is not None else [], [])
        records.append(Decision(peers[own], round, None, ACCEPTED, "own update kept (nothing else was usable)"))
        if values is None:
            raise ValueError("the receiver's own update is unusable and there is nothing to aggregate")
    elif not ok:
        records.append(Decision(peers[own], round, None, ACCEPTED, "own update kept; the check still fails"))
    result.decisions = records + result.decisions
    return result


def _suspicion(update, mask, bad_entries: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(holds a non-finite entry of the aggregate, largest absolute value) of one member: bigger is likelier."""
    holds = 0
    top = 0.0
    for layer, v in update.items():
        if (
            mask is not None
            and layer in bad_entries
            and layer in mask
            and mask[layer].shape == bad_entries[layer].shape
        ):
            holds |= int(bool((mask[layer] & bad_entries[layer]).any()))
        if isinstance(v, torch.Tensor) and v.numel():
            a = float(v.detach().abs().max())
            top = max(top, a if math.isfinite(a) else float("inf"))
    return holds, top


def _own_only(update, mask, reference) -> dict[str, torch.Tensor] | None:
    if mask is None:
        return None
    out = {}
    for layer, mk in mask.items():
        base = reference.get(layer) if reference is not None else None
        base = torch.zeros(mk.shape) if base is None else base
        d = _dense(layer, update[layer], mk).to(torch.promote_types(base.dtype, torch.float32))
        out[layer] = torch.where(mk, d, base.to(d.dtype)) if _finite(d) else base.to(d.dtype)
    return out
