"""The routers of the implicit MoE, in one place: ``ROUTERS`` maps a name to a :class:`Router` class.

A router decides, in every expert layer and for every token, which rank-1 components of which experts
(clusters) are kept. The model picks its router by name (``ImplicitMoEConfig.router``, saved in ``config.json``);
per-router options live in ``ImplicitMoEConfig.router_options[name]``. Adding a router means writing one subclass
here and adding it to ``ROUTERS``: the config validation, ``set_router``, saving and loading follow from there.

Routers:

- ``implicit`` (the paper, Eq. 29): per token and layer, keep the ``router_top_k`` components with the largest
  ``|a_c · x|`` over all experts: the frozen projections are the router.
- ``sum``: every component of every expert (no routing). ``average``: the same, each expert divided by the number of
  experts (task arithmetic).
- ``hard`` (formerly ``oracle``, still accepted): only the components of the expert named per input
  (``expert_ids=``/``task_ids=``): routing by the true task, an upper bound for the routers.
- ``sequence``: a sequence-level router. Each expert carries a few centroids of mean-pooled hidden states of the bare
  base on its members' data (:mod:`moe_router.centroids`). At prefill the prompt's mean-pooled hidden state (the input
  of the pooling layer, default the first expert layer, in the same forward; or the input embeddings) picks the
  ``choose`` experts whose nearest centroid is most cosine-similar; the choice is stored per sequence of the batch and
  reused at every decode step (KV-cache generation does not re-choose); the token-level top-k of ``|a_c · x|`` then
  runs only inside the chosen experts' components (``router_top_k=None`` keeps all of them: hard routing by the
  predicted cluster).
- ``spectral``: data-free (SpectR-style). For each layer and expert, ``ΔW_e = B_e diag(scale) A_e = U S Vᵀ``; the
  score of expert ``e`` for a token ``x`` is ``‖S_r V_rᵀ x‖ / ‖x‖`` (the projection of ``x`` on the expert's top
  ``r`` right-singular vectors, scaled by the singular values; with ``r`` = the expert's rank it is ``‖ΔW_e x‖/‖x‖``).
  ``granularity="sequence"`` (default): per layer, the scores are averaged over the prompt's real tokens at prefill,
  the ``choose`` best experts are kept for the whole generation (like ``sequence``); ``"token"``: chosen per token.
  Then the token-level top-k runs inside the chosen experts, as for ``sequence``.

Prefill vs decode is told by the model's forward pre-hook: a forward whose KV cache is absent or empty is a prefill
(a new choice); one with a non-empty cache is a decode step (the stored choice is reused). Without a cache (e.g.
``generate(use_cache=False)``) every forward is a prefill of the whole sequence so far. Beam search and
``num_return_sequences`` expand the prompt before prefill, so each row gets its own choice and beams of one prompt
share it.

This module imports only torch so that it can travel to the Hub as remote code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F


class ImplicitMoELinear(Protocol):
    """What a router reads of an expert layer (:class:`moe_router.layer.ImplicitMoELinear`, which imports this
    module: a protocol here, so the two modules do not import each other)."""

    layer_key: str
    expert: torch.Tensor  # (R,) the expert (cluster) id of each component
    scale: torch.Tensor  # (R,)
    B: torch.Tensor  # (out, R)

    def projection(self, refined: bool | None = None) -> torch.Tensor: ...


__all__ = [
    "Router",
    "ROUTERS",
    "ROUTER_ALIASES",
    "ForwardInputs",
    "ImplicitRouter",
    "SumRouter",
    "AverageRouter",
    "HardRouter",
    "SequenceRouter",
    "SpectralRouter",
    "resolve_router_name",
    "check_router_options",
    "make_router",
    "router_names",
    "top_k_within",
    "EMBEDDINGS",
]

EMBEDDINGS = "embeddings"  # pool_layer value: mean-pool the input embeddings instead of a layer's input


@dataclass
class ForwardInputs:
    """What the model's forward pre-hook tells the router about one forward of the base model."""

    prefill: bool  # no KV cache or an empty one: a new prompt (choose); else a decode step (reuse the choice)
    input_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        """Rows in this forward (None when neither ids nor embeddings were passed by keyword)."""
        for t in (self.input_ids, self.inputs_embeds):
            if t is not None:
                return int(t.shape[0])
        return None


def top_k_within(h: torch.Tensor, allowed: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep, per token, the ``k`` components with the largest ``|h|`` among the ``allowed`` ones (all allowed when
    ``k`` is None or at least the number of components). ``allowed`` broadcasts to ``h`` (..., R)."""
    allowed = allowed.expand_as(h)
    if k is None or k >= h.shape[-1]:
        return allowed
    index = h.abs().masked_fill(~allowed, -1.0).topk(k, dim=-1).indices
    return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, index, True) & allowed


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` (batch, seq, d) over the positions where ``mask`` (batch, seq) is nonzero; all positions else."""
    x = x.float()
    if x.ndim == 2:
        return x
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        w = mask.to(x.device).float().unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
    return x.mean(1)


def _expand_choice(layer: ImplicitMoELinear, chosen: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1.., R) mask of the components of the experts in ``chosen`` (batch, n)."""
    if h.ndim < 2 or h.shape[0] != chosen.shape[0]:
        raise ValueError(
            f"layer {layer.layer_key!r}: the stored routing choice is for a batch of {chosen.shape[0]}, this forward "
            f"has {h.shape[0] if h.ndim else 0} rows: start a new prompt (a forward without a KV cache) to re-route"
        )
    allowed = (layer.expert.view(1, 1, -1) == chosen.to(layer.expert.device).unsqueeze(-1)).any(1)  # (batch, R)
    return allowed.view(allowed.shape[0], *([1] * (h.ndim - 2)), allowed.shape[-1])


class Router:
    """A routing rule: which components each expert layer keeps per token. Subclasses set ``name`` and override
    :meth:`keep` (and :meth:`begin`, :meth:`component_scale` where they need to).

    ``OPTIONS`` lists the router's options and their defaults (validated by :meth:`check_options`); ``REQUIRES``
    the router tensors (``RouterState.tensors``, saved in ``experts.safetensors``) it cannot work without.
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[Mapping[str, Any]] = {}
    REQUIRES: ClassVar[tuple[str, ...]] = ()
    NEEDS_REQUIRED: ClassVar[str] = ""  # how to provide REQUIRES, for the error message

    def __init__(self, state: RouterState, options: Mapping[str, Any] | None = None) -> None:
        self.state = state
        self.options: dict[str, Any] = {**self.OPTIONS, **self.check_options(options or {})}
        missing = [t for t in self.REQUIRES if t not in state.tensors]
        if missing:
            raise ValueError(f"router {self.name!r} needs {missing}: {self.NEEDS_REQUIRED}")

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``options`` (raise ``ValueError`` naming the bad one); returns them unchanged as a dict."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            known = sorted(cls.OPTIONS) or "none"
            raise ValueError(f"router {cls.name!r} has no options {unknown} (its options: {known})")
        return dict(options)

    def begin(self, inputs: ForwardInputs) -> None:
        """Called once per forward of the base model, before any expert layer runs (per-sequence routers choose or
        check their stored choice here)."""

    def keep(self, layer: ImplicitMoELinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """Boolean mask over the components of ``h`` (..., R), the routing scores ``A x`` of the layer input ``x``;
        None keeps every component."""
        return None

    def component_scale(self, layer: ImplicitMoELinear) -> torch.Tensor:
        """Per-component scale applied to the kept activations (``alpha / r`` of each member)."""
        return layer.scale


class ImplicitRouter(Router):
    """The paper's router (Eq. 29): per token, the ``router_top_k`` largest ``|a_c · x|`` over all experts."""

    name = "implicit"

    def keep(self, layer: ImplicitMoELinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        k = self.state.top_k
        if k is None or k >= h.shape[-1]:
            return None
        index = h.abs().topk(k, dim=-1).indices
        return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, index, True)


class SumRouter(Router):
    """Every component of every expert (the plain sum of the experts; ``router_top_k`` is ignored)."""

    name = "sum"


class AverageRouter(Router):
    """Every component, each expert divided by the number of experts (task arithmetic)."""

    name = "average"

    def component_scale(self, layer: ImplicitMoELinear) -> torch.Tensor:
        return layer.scale / self.state.num_experts


class HardRouter(Router):
    """Only the expert named per input (``expert_ids=`` or ``task_ids=``: an int, or one id per row): routing by the
    true task (the oracle upper bound); all of that expert's components are kept."""

    name = "hard"

    def keep(self, layer: ImplicitMoELinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        ids = self.state.expert_ids
        if ids is None:
            raise ValueError("oracle routing needs expert ids: pass expert_ids= (or task_ids=) to forward/generate")
        if isinstance(ids, int):
            return (layer.expert == ids).expand_as(h)
        ids = torch.as_tensor(ids, device=h.device).long().flatten()
        if h.ndim < 2 or ids.numel() != h.shape[0]:
            raise ValueError(f"expert_ids has {ids.numel()} entries for a batch of {h.shape[0] if h.ndim else 0}")
        ids = ids.view(-1, *([1] * (h.ndim - 1)))
        return (layer.expert == ids).expand_as(h)


def _check_choose(name: str, value: Any, num_experts: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"router {name!r}: choose must be a positive integer, got {value!r}")
    if num_experts is not None and value > num_experts:
        raise ValueError(f"router {name!r}: choose={value} but only {num_experts} experts can be chosen")
    return value


class SequenceRouter(Router):
    """Per prompt, the ``choose`` experts whose centroid is nearest (cosine) to the prompt's mean-pooled hidden state,
    kept through decoding; the token-level top-k runs inside them.

    Options: ``choose`` (experts per prompt, default 1); ``pool_layer``: the expert layer whose input is pooled
    (default None: the first expert layer in the base model's module order; the centroids must be computed on the
    same layer of the bare base: :func:`moe_router.centroids.sequence_centroids`) or ``"embeddings"`` (the input
    embeddings: what the collaboration protocol pools, ``moe_router.centroids.PROTOCOL_POOL``, since they told the
    study's two film-review tasks apart on 97.5-100% of prompts, against 83% on the worst seed for the first layer's
    input). Needs the router tensors ``centroids`` (E, K, d) and ``centroid_mask`` (E, K): see
    ``ImplicitMoEPreTrainedModel.set_centroids``.
    """

    name = "sequence"
    OPTIONS = {"choose": 1, "pool_layer": None}
    REQUIRES = ("centroids", "centroid_mask")
    NEEDS_REQUIRED = "build with centroids= or call model.set_centroids(...) first (moe_router.sequence_centroids)"
    CHOICE = "sequence"

    def __init__(self, state: RouterState, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(state, options)
        mask = state.tensors["centroid_mask"].bool()
        usable = int(mask.any(-1).sum())
        _check_choose(self.name, self.options["choose"], usable)
        pool = self.options["pool_layer"]
        if pool is None:
            pool = state.layer_keys[0] if state.layer_keys else None
        if pool != EMBEDDINGS and pool not in state.layer_keys:
            raise ValueError(
                f"router 'sequence': pool_layer {pool!r} is neither {EMBEDDINGS!r} nor an expert layer "
                f"(first ones: {list(state.layer_keys)[:3]})"
            )
        self.pool_layer: str = pool
        self._pending = False
        embed = state.embed
        width = getattr(embed, "embedding_dim", None) if pool == EMBEDDINGS else state.layer_widths.get(pool)
        have = int(state.tensors["centroids"].shape[-1])
        if width is not None and width != have:
            raise ValueError(
                f"router 'sequence': centroids have {have} features but the pooled input of {pool!r} has {width}: "
                "centroids computed on another layer or base model?"
            )

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        if "choose" in options:
            _check_choose(cls.name, options["choose"])
        pool = options.get("pool_layer")
        if pool is not None and not isinstance(pool, str):
            raise ValueError(f"router 'sequence': pool_layer must be a layer key or {EMBEDDINGS!r}, got {pool!r}")
        return options

    def choose(self, pooled: torch.Tensor) -> torch.Tensor:
        """The ``choose`` experts (batch, choose) whose best centroid is most cosine-similar to ``pooled`` (batch, d);
        the similarities (batch, E) are left in ``state.last_scores``."""
        centroids = self.state.tensors["centroids"].to(pooled.device).float()
        mask = self.state.tensors["centroid_mask"].to(pooled.device).bool()
        if pooled.shape[-1] != centroids.shape[-1]:
            raise ValueError(
                f"router 'sequence': the pooled hidden state has {pooled.shape[-1]} features, the centroids "
                f"{centroids.shape[-1]}: centroids computed on another layer ({self.pool_layer!r} here) or base model?"
            )
        sim = torch.einsum("bd,ekd->bek", F.normalize(pooled.float(), dim=-1), F.normalize(centroids, dim=-1))
        scores = sim.masked_fill(~mask.unsqueeze(0), -math.inf).amax(-1)  # (batch, E)
        self.state.last_scores = scores.detach()
        return scores.topk(self.options["choose"], dim=-1).indices

    def begin(self, inputs: ForwardInputs) -> None:
        state = self.state
        if inputs.prefill:
            state.choices.pop(self.CHOICE, None)
            self._pending = True
            if self.pool_layer == EMBEDDINGS:
                embeds = inputs.inputs_embeds
                if embeds is None:
                    if inputs.input_ids is None or state.embed is None:
                        raise ValueError(
                            "router 'sequence' with pool_layer='embeddings' needs input_ids or inputs_embeds"
                        )
                    with torch.no_grad():
                        embeds = state.embed(inputs.input_ids)
                state.choices[self.CHOICE] = self.choose(_masked_mean(embeds.detach(), inputs.attention_mask))
                self._pending = False
            return
        self._pending = False
        chosen = state.choices.get(self.CHOICE)
        if chosen is None:
            raise ValueError(
                "router 'sequence': a decode step (non-empty KV cache) but no prompt was routed: run the prompt "
                "through this model first (generate does)"
            )
        rows = inputs.batch_size
        if rows is not None and rows != chosen.shape[0]:
            raise ValueError(
                f"router 'sequence': the prompt routed {chosen.shape[0]} sequences, this decode step has {rows}"
            )

    def keep(self, layer: ImplicitMoELinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        state = self.state
        if self._pending and layer.layer_key == self.pool_layer:
            mask = state.inputs.attention_mask if state.inputs is not None else None
            state.choices[self.CHOICE] = self.choose(_masked_mean(x.detach(), mask))
            self._pending = False
        chosen = state.choices.get(self.CHOICE)
        if chosen is None:
            raise ValueError(
                f"router 'sequence': layer {layer.layer_key!r} ran before the pooling layer {self.pool_layer!r} chose "
                "the experts: set router_options={'sequence': {'pool_layer': <the first expert layer to run>}} "
                "(or 'embeddings')"
            )
        return top_k_within(h, _expand_choice(layer, chosen, h), state.top_k)


class SpectralRouter(Router):
    """Data-free scores from the SVD of each expert's ΔW per layer (SpectR-style), per sequence or per token.

    Options: ``choose`` (experts kept, default 1), ``granularity`` (``"sequence"``: mean of the per-token scores over
    the prompt's real tokens at prefill, kept through decoding, per layer; ``"token"``: chosen per token),
    ``rank`` (right-singular directions per expert, None = all, i.e. the score is ``‖ΔW_e x‖ / ‖x‖``).
    """

    name = "spectral"
    OPTIONS = {"choose": 1, "granularity": "sequence", "rank": None}
    GRANULARITIES = ("sequence", "token")

    def __init__(self, state: RouterState, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(state, options)
        _check_choose(self.name, self.options["choose"], state.num_experts)
        self._prefill = True

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        if "choose" in options:
            _check_choose(cls.name, options["choose"])
        if options.get("granularity", "sequence") not in cls.GRANULARITIES:
            raise ValueError(f"router 'spectral': granularity must be one of {cls.GRANULARITIES}, got {options!r}")
        rank = options.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"router 'spectral': rank must be a positive integer or None, got {rank!r}")
        return options

    def factors(self, layer: ImplicitMoELinear) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, onehot)`` for ``layer``: ``P`` (rows, in) stacks each expert's ``S_r V_rᵀ``; ``onehot`` (rows, E)
        says which expert each row belongs to. Computed once per layer (QR of the factors, SVD of an r x r core)."""
        refined = self.state.refine == "task_stats"
        key = ("spectral", refined, self.options["rank"])
        cache = layer.__dict__.setdefault("_router_cache", {})
        if key in cache:
            return cache[key]
        a_all = layer.projection(refined=refined).float()
        rows, owners = [], []
        for e in range(self.state.num_experts):
            chosen = layer.expert == e
            if not bool(chosen.any()):
                continue
            b = layer.B[:, chosen].float() * layer.scale[chosen].float()  # out x r
            a = a_all[chosen]  # r x in
            qb, rb = torch.linalg.qr(b)
            qa, ra = torch.linalg.qr(a.T)  # in x r, r x r
            _, s, vh = torch.linalg.svd(rb @ ra.T)  # ΔW = qb (rb raᵀ) qaᵀ
            r = s.numel() if self.options["rank"] is None else min(self.options["rank"], s.numel())
            rows.append(s[:r, None] * (vh[:r] @ qa.T))  # S_r V_rᵀ, r x in
            owners.append(torch.full((r,), e, dtype=torch.long, device=a.device))
        p = torch.cat(rows)
        onehot = F.one_hot(torch.cat(owners), self.state.num_experts).to(p.dtype)
        cache[key] = (p, onehot)
        return p, onehot

    def scores(self, layer: ImplicitMoELinear, x: torch.Tensor) -> torch.Tensor:
        """Score of every expert for every token of ``x`` (..., in): ``‖S_r V_rᵀ x‖ / ‖x‖`` (..., E), >= 0; experts
        without components on this layer score 0."""
        p, onehot = self.factors(layer)
        x = x.float()
        energy = F.linear(x, p).pow(2) @ onehot
        return energy.sqrt() / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def begin(self, inputs: ForwardInputs) -> None:
        self._prefill = inputs.prefill
        if inputs.prefill:
            self.state.choices.clear()

    def keep(self, layer: ImplicitMoELinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        state = self.state
        choose = self.options["choose"]
        if self.options["granularity"] == "token":
            chosen = self.scores(layer, x).topk(choose, dim=-1).indices  # (..., choose)
            allowed = (layer.expert == chosen.unsqueeze(-1)).any(-2)  # (..., R)
            return top_k_within(h, allowed, state.top_k)
        key = f"spectral:{layer.layer_key}"
        if self._prefill or key not in state.choices:
            if not self._prefill:
                raise ValueError(
                    "router 'spectral': a decode step (non-empty KV cache) but no prompt was routed: run the prompt "
                    "through this model first (generate does)"
                )
            mask = state.inputs.attention_mask if state.inputs is not None else None
            pooled = _masked_mean(self.scores(layer, x.detach()), mask)  # (batch, E)
            state.choices[key] = pooled.topk(choose, dim=-1).indices
        return top_k_within(h, _expand_choice(layer, state.choices[key], h), state.top_k)


ROUTERS: dict[str, type[Router]] = {
    cls.name: cls for cls in (ImplicitRouter, SumRouter, AverageRouter, HardRouter, SequenceRouter, SpectralRouter)
}
ROUTER_ALIASES: dict[str, str] = {"oracle": "hard"}  # old names still accepted (normalised to the new one)


def router_names() -> list[str]:
    """The registered router names (aliases excluded), sorted."""
    return sorted(ROUTERS)


def resolve_router_name(name: Any) -> str:
    """The registered name for ``name`` (aliases resolved); ``ValueError`` naming the known routers otherwise."""
    if isinstance(name, str):
        name = ROUTER_ALIASES.get(name, name)
        if name in ROUTERS:
            return name
    aliases = ", ".join(f"{old!r} for {new!r}" for old, new in ROUTER_ALIASES.items())
    raise ValueError(f"router must be one of {router_names()} (also accepted: {aliases}), got {name!r}")


def check_router_options(options: Any) -> dict[str, dict[str, Any]]:
    """Validate ``router_options`` (router name -> options); returns a plain dict keyed by resolved names."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"router_options must map a router name to its options, got {options!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, opts in options.items():
        resolved = resolve_router_name(name)
        if not isinstance(opts, Mapping):
            raise ValueError(f"router_options[{name!r}] must be a mapping of options, got {opts!r}")
        out[resolved] = ROUTERS[resolved].check_options(opts)
    return out


def make_router(state: RouterState, name: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Router:
    """Instantiate router ``name`` on ``state`` with its entry of ``options`` (router name -> options)."""
    name = resolve_router_name(name)
    return ROUTERS[name](state, (options or {}).get(name))


@dataclass
class RouterState:
    """Routing settings and per-forward routing state shared by all expert layers of one model (changed through the
    model, read by the layers).

    ``routing``: the active router's name (:data:`moe_router.routers.ROUTERS`), ``impl`` its instance (built by
    :meth:`configure`); ``options``: router name -> options; ``tensors``: router data that travels with the experts
    (e.g. the ``sequence`` router's ``centroids``); ``choices``: per-sequence choices stored at prefill and reused
    while decoding; ``inputs``: what the current forward's pre-hook saw; ``layer_keys``: expert layers in module
    order; ``embed``: the base model's input embeddings (for routers that pool them).
    """

    num_experts: int
    top_k: int | None = None
    routing: str = "implicit"
    refine: str = "none"  # "none", "task_stats" (values refined, Eq. 26 literally) or "routing" (selection only)
    expert_ids: torch.Tensor | int | None = None
    recorder: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = field(default=None, repr=False)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    layer_keys: list[str] = field(default_factory=list)
    layer_widths: dict[str, int] = field(default_factory=dict)  # in_features per expert layer
    choices: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    inputs: ForwardInputs | None = field(default=None, repr=False)
    last_scores: torch.Tensor | None = field(default=None, repr=False)
    embed: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    impl: Router | None = field(default=None, repr=False)

    def configure(self, routing: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Router:
        """Make ``routing`` (with its entry of ``options``) the active router; the stored choices are dropped."""
        impl = make_router(self, routing, options if options is not None else self.options)
        self.impl, self.routing = impl, impl.name
        if options is not None:
            self.options = {k: dict(v) for k, v in options.items()}
        self.choices.clear()
        return impl

    def begin(self, inputs: ForwardInputs) -> None:
        """Called by the model's forward pre-hook once per forward of the base model, before any expert layer."""
        self.inputs = inputs
        if self.impl is None:
            self.configure(self.routing)
        self.impl.begin(inputs)
