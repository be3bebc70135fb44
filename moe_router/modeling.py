"""``ImplicitMoEForCausalLM``: a base model whose target layers serve every cluster's SO-LoRA experts at once.

The expert layers are injected into the wrapped base model, so its own forward, cache and generation loop run
unchanged. Saved as ``config.json`` + ``experts.safetensors``; the base model is referenced by id (or saved in
``base/`` when asked), with a ``README.md`` model card (:mod:`model_cards`) whose generated sections are refreshed
on every save and push while user text is kept. This module imports only torch, transformers and safetensors, so that
it can travel to the Hub as remote code; the builders that read SO-LoRA adapters live in :mod:`moe_router.builders`,
and ``model_cards`` is imported only when a card is written (no card, with a warning, where it is not installed).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import cached_file

from .configuration import BASE_SUBFOLDER, EXPERTS_FILE, ImplicitMoEConfig, check_router_settings
from .layer import ImplicitMoELinear, LayerExperts
from .routers import ROUTERS, ForwardInputs, RouterState, resolve_router_name

__all__ = [
    "ImplicitMoEPreTrainedModel",
    "ImplicitMoEForCausalLM",
    "ImplicitMoEForSequenceClassification",
    "routing_shares",
]

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")
_AUTO_KWARGS = ("_from_auto", "trust_remote_code", "adapter_kwargs", "_commit_hash", "code_revision")
FILE_FORMAT = "solora-moe-experts/1"
_UNCHANGED: Any = object()
CARD_FILE = "README.md"
ROUTER_PREFIX = "router::"  # router tensors (e.g. the sequence router's centroids) in the experts file

logger = logging.getLogger(__name__)


def _cache_length(past: Any) -> int:
    """Tokens already in a KV cache (0 for an empty one)."""
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(past[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


def _begin_forward(state: RouterState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the wrapped base model: tell the router whether this forward is a prefill (no or an empty
    KV cache: route the prompt) or a decode step (reuse the choice), with the ids, embeddings and attention mask."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    past = kwargs.get("past_key_values")
    if past is None:
        past = kwargs.get("cache")  # the name transformers' generate uses for the KV cache
    prefill = past is None or _cache_length(past) == 0
    state.begin(ForwardInputs(prefill, ids, kwargs.get("inputs_embeds"), mask))


def _pad_centroids(centroids: Any, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert centroids (a list/mapping of ``k_e x d`` tensors, or an ``E x K x d`` tensor) as the padded
    ``centroids`` (E, K, d) and ``centroid_mask`` (E, K) router tensors."""
    if isinstance(centroids, torch.Tensor):
        if centroids.ndim != 3 or centroids.shape[0] != num_experts:
            raise ValueError(f"centroids must be (experts={num_experts}, K, d), got {tuple(centroids.shape)}")
        centroids = list(centroids)
    elif isinstance(centroids, Mapping):
        bad = [k for k in centroids if not (isinstance(k, int) and 0 <= k < num_experts)]
        if bad:
            raise ValueError(f"centroids keys {bad[:5]} are not expert indices 0..{num_experts - 1}")
        centroids = [centroids.get(e) for e in range(num_experts)]
    elif isinstance(centroids, Sequence):
        if len(centroids) != num_experts:
            raise ValueError(f"{len(centroids)} centroid sets for {num_experts} experts")
    else:
        raise TypeError(f"centroids must be a list or mapping of per-expert tensors, got {type(centroids).__name__}")
    sets = [torch.empty(0, 0) if c is None else torch.as_tensor(c).detach().float().cpu() for c in centroids]
    sets = [c.unsqueeze(0) if c.ndim == 1 else c for c in sets]
    dims = {int(c.shape[-1]) for c in sets if c.numel()}
    if len(dims) != 1 or any(c.ndim != 2 for c in sets if c.numel()):
        raise ValueError(f"centroids must be k x d tensors with one d for every expert, got dims {sorted(dims)}")
    d = dims.pop()
    k = max(int(c.shape[0]) for c in sets if c.numel())
    out = torch.zeros(num_experts, k, d)
    mask = torch.zeros(num_experts, k, dtype=torch.bool)
    for e, c in enumerate(sets):
        if c.numel():
            if not torch.isfinite(c).all():
                raise ValueError(f"centroids of expert {e} contain NaN or Inf")
            out[e, : c.shape[0]], mask[e, : c.shape[0]] = c, True
    if not mask.any():
        raise ValueError("no expert has a centroid")
    return {"centroids": out, "centroid_mask": mask}


def _base_name(base_model: nn.Module) -> str | None:
    config = getattr(base_model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(base_model, "name_or_path", None)
    return str(name) if name else None


def _bundled_base(config: ImplicitMoEConfig, dtype: Any) -> PreTrainedModel | None:
    """The copy of the base bundled with ``peft-sorlora`` when it is installed and its weights fingerprint is the
    config's ``base_fingerprint``; None otherwise (also without a fingerprint: a name alone proves nothing)."""
    base = _optional("peft_sorlora.base_model")
    if not config.base_fingerprint or base is None:
        return None
    try:
        base.bundled_base_path()
    except FileNotFoundError:
        return None
    model, _ = base.load_base_model()
    if base.base_fingerprint(model) != config.base_fingerprint:
        return None
    logger.info("the base %s is loaded from the copy bundled with peft-sorlora (fingerprint %s)",
                config.base_model_name_or_path, config.base_fingerprint)  # fmt: skip
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def _load_named_base(cls: type, auto: Any, config: ImplicitMoEConfig, path: str, hub: dict, kwargs: dict) -> Any:
    """The base named by ``config.base_model_name_or_path``: the copy bundled with ``peft-sorlora`` when the name is
    the bundled model's and its fingerprint is the config's (the exact weights the experts were trained on: the Hub's
    SmolLM2 is the original, not the dequantized bundled copy), else fetched from the Hub endpoint (or the path it
    names); where it cannot be fetched, the bundled copy when its fingerprint agrees, else an ``OSError`` saying in
    one line what to pass."""
    name = config.base_model_name_or_path
    causal = cls.base_auto_class == "AutoModelForCausalLM"
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    # only a config with a fingerprint can use the bundled copy (then peft_sorlora, when installed, is imported)
    bundled_id = (
        getattr(_optional("peft_sorlora.base_model"), "BUNDLED_BASE_ID", None) if config.base_fingerprint else None
    )
    if causal and name == bundled_id:
        bundled = _bundled_base(config, dtype)
        if bundled is not None:
            return bundled
    try:
        return auto.from_pretrained(name, **hub, **kwargs)
    except OSError as exc:
        if causal and config.base_fingerprint and name != bundled_id:
            bundled = _bundled_base(config, dtype)
            if bundled is not None:
                return bundled
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        fingerprint = f", weights fingerprint {config.base_fingerprint}" if config.base_fingerprint else ""
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OSError(
            f"the base model {name!r} of {path!r} cannot be loaded from {endpoint} ({why}): pass a local copy of it"
            f"{fingerprint}: from_pretrained({path!r}, base_model=AutoModelForCausalLM.from_pretrained(PATH))"
        ) from exc


def _optional(module: str) -> Any:
    """``module`` when it can be imported, else None (this file travels as remote code without peft_sorlora)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


class ImplicitMoEPreTrainedModel(PreTrainedModel):
    """Shared wrapper: a base model (loaded through ``base_auto_class``) with :class:`ImplicitMoELinear` experts."""

    config_class = ImplicitMoEConfig
    base_model_prefix = "model"
    base_auto_class = "AutoModel"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        config: ImplicitMoEConfig,
        base_model: PreTrainedModel | None = None,
        experts: Mapping[str, LayerExperts] | None = None,
        router_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Wrap ``base_model`` (modified in place) with ``experts`` (layer key -> components) under ``config``;
        ``router_tensors``: router data saved with the experts (e.g. ``centroids``/``centroid_mask``)."""
        if base_model is None:
            raise ValueError(
                f"{type(self).__name__} needs its base model: use from_adapters(...) or from_pretrained(...)"
            )
        if not experts:
            raise ValueError("no experts given: at least one layer must carry expert components")
        super().__init__(config)
        expected_type = config.base_model_type
        base_type = getattr(getattr(base_model, "config", None), "model_type", None)
        if expected_type and base_type and expected_type != base_type:
            raise ValueError(f"experts were built for a {expected_type!r} base model, got a {base_type!r} model")
        if config.target_layers and set(config.target_layers) != set(experts):
            raise ValueError(
                f"experts name layers {sorted(set(experts) ^ set(config.target_layers))[:5]} that the config does not "
                "(or the reverse): config and experts file disagree"
            )
        num_experts = config.num_experts or 1 + max(int(e.expert.max()) for e in experts.values())
        modules = dict(base_model.named_modules())
        embeddings = base_model.get_input_embeddings() if hasattr(base_model, "get_input_embeddings") else None
        self.router = RouterState(
            num_experts=num_experts,
            top_k=config.router_top_k,
            routing=config.router,
            refine=config.refine,
            options=copy.deepcopy(config.router_options or {}),
            tensors={k: v.detach().cpu() for k, v in (router_tensors or {}).items()},
            layer_keys=[k for k in modules if k in experts],
            layer_widths={k: int(e.shape[1]) for k, e in experts.items()},
            embed=embeddings,
        )
        for key, layer_experts in experts.items():
            target = modules.get(key)
            if target is None:
                raise ValueError(f"layer {key!r} of the experts does not exist in the base model: another base model?")
            if not isinstance(target, nn.Linear):
                raise ValueError(f"layer {key!r} of the base model is a {type(target).__name__}, not a Linear")
            parent_name, _, child = key.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            setattr(parent, child, ImplicitMoELinear(target, layer_experts, self.router, layer_key=key))
        self.router.configure(config.router)
        self._router_hook = base_model.register_forward_pre_hook(
            functools.partial(_begin_forward, self.router), with_kwargs=True
        )
        config.target_layers = {key: list(e.shape) for key, e in experts.items()}
        config.base_model_type = config.base_model_type or base_type
        self.model = base_model
        if getattr(base_model, "generation_config", None) is not None:
            self.generation_config = base_model.generation_config
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """No-op: the base model is pretrained and the experts are given, nothing is initialised at random."""

    def init_weights(self) -> None:
        """No-op (see :meth:`_init_weights`); ties are the wrapped base model's business."""

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    # ----------------------------------------------------------------------------------------------------- experts
    @property
    def num_experts(self) -> int:
        """Number of experts served (one per cluster)."""
        return self.router.num_experts

    def expert_layers(self) -> dict[str, ImplicitMoELinear]:
        """Layer key -> expert layer, in module order."""
        return {m.layer_key: m for m in self.model.modules() if isinstance(m, ImplicitMoELinear)}

    def set_router(
        self,
        *,
        top_k: Any = _UNCHANGED,
        routing: str | None = None,
        refine: str | None = None,
        router: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Change the routing here and in the config: ``router`` (or its old name ``routing``): a name of
        :data:`moe_router.routers.ROUTERS`; ``options``: that router's options (replace its entry of
        ``config.router_options``); ``top_k``: int, None or ``"all"``; ``refine``. Validated before anything
        changes (a ``ValueError`` leaves the model as it was)."""
        if router is not None and routing is not None and resolve_router_name(router) != resolve_router_name(routing):
            raise ValueError(f"router={router!r} and routing={routing!r} disagree: give one of them")
        name = resolve_router_name(router or routing or self.config.router)
        all_options = copy.deepcopy(self.config.router_options or {})
        if options is not None:
            all_options[name] = ROUTERS[name].check_options(options)
        self._apply_router(self.config.router_top_k if top_k is _UNCHANGED else top_k, name,
                           refine or self.config.refine, all_options)  # fmt: skip

    def _apply_router(self, top_k: Any, name: str, refine: str, all_options: dict[str, dict[str, Any]]) -> None:
        top_k = check_router_settings(top_k, name, refine)
        self.router.configure(name, all_options)  # raises before anything is changed when the router cannot work
        self.config.router_top_k, self.config.router, self.config.routing = top_k, name, name
        self.config.refine, self.config.router_options = refine, copy.deepcopy(all_options)
        self.router.top_k, self.router.refine = top_k, refine

    @contextlib.contextmanager
    def router_settings(
        self,
        *,
        top_k: Any = _UNCHANGED,
        routing: str | None = None,
        refine: str | None = None,
        router: str | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        """:meth:`set_router` for the duration of a ``with`` block (the previous settings come back on exit)."""
        config = self.config
        previous = (config.router_top_k, config.router, config.refine, copy.deepcopy(config.router_options or {}))
        self.set_router(top_k=top_k, routing=routing, refine=refine, router=router, options=options)
        try:
            yield self
        finally:
            self._apply_router(*previous)

    def set_centroids(self, centroids: Any, *, pool_layer: str | None = None) -> None:
        """Give the ``sequence`` router its centroids: per expert a ``k_e x d`` tensor (a list aligned with the
        experts, a mapping expert index -> tensor, or a padded ``E x K x d`` tensor; an expert without centroids is
        never chosen). ``d`` is the width of the pooled hidden state: the input of ``pool_layer`` (default: the first
        expert layer) or the embeddings (``pool_layer="embeddings"``), on the bare base, as
        :func:`moe_router.centroids.sequence_centroids` computes them. Saved in ``experts.safetensors``.
        ``pool_layer`` given is stored in ``config.router_options["sequence"]``. ``None`` removes the centroids."""
        padded = _pad_centroids(centroids, self.num_experts) if centroids is not None else {}
        options = copy.deepcopy(self.config.router_options or {})
        if pool_layer is not None:
            options["sequence"] = ROUTERS["sequence"].check_options({**options.get("sequence", {}),
                                                                     "pool_layer": pool_layer})  # fmt: skip
        previous_tensors, previous_options = dict(self.router.tensors), copy.deepcopy(self.config.router_options or {})
        for key in ("centroids", "centroid_mask"):
            self.router.tensors.pop(key, None)
        self.router.tensors.update(padded)
        try:
            if padded:  # check the centroids against the pooling layer now, not at the first prompt
                ROUTERS["sequence"](self.router, options.get("sequence"))
            self._apply_router(self.config.router_top_k, self.config.router, self.config.refine, options)
        except ValueError:
            self.router.tensors.clear()
            self.router.tensors.update(previous_tensors)
            self._apply_router(self.config.router_top_k, self.config.router, self.config.refine, previous_options)
            raise

    def routing_choices(self) -> dict[str, torch.Tensor]:
        """The per-sequence choices of the last prompt (``"sequence"``: chosen experts, batch x choose; per-sequence
        ``spectral``: ``"spectral:<layer>"`` per layer), as stored for the decode steps; empty for per-token routers."""
        return {k: v.detach().clone() for k, v in self.router.choices.items()}

    def reorder_routing(self, index: torch.Tensor) -> None:
        """Reorder the stored per-sequence choices as a KV cache's ``reorder_cache(index)`` reorders its rows (e.g.
        one prompt's cache copied to each of its continuations), so that the decode steps keep each prompt's choice."""
        for key, chosen in list(self.router.choices.items()):
            self.router.choices[key] = chosen.index_select(0, torch.as_tensor(index).long().to(chosen.device))

    @contextlib.contextmanager
    def routed(self, expert_ids: torch.Tensor | int | list[int] | None = None) -> Iterator[None]:
        """Within this block, ``oracle`` routing uses ``expert_ids`` (an int, or one id per sample of the batch)."""
        if expert_ids is not None and not isinstance(expert_ids, int):
            expert_ids = torch.as_tensor(expert_ids).long().flatten()
            bad = expert_ids[(expert_ids < 0) | (expert_ids >= self.num_experts)]
            if bad.numel():
                raise ValueError(f"expert ids must be in [0, {self.num_experts - 1}], got {bad.tolist()}")
        elif isinstance(expert_ids, int) and not 0 <= expert_ids < self.num_experts:
            raise ValueError(f"expert id must be in [0, {self.num_experts - 1}], got {expert_ids}")
        previous = self.router.expert_ids
        if expert_ids is not None:
            self.router.expert_ids = expert_ids
        try:
            yield
        finally:
            self.router.expert_ids = previous

    @contextlib.contextmanager
    def recording(self, recorder) -> Iterator[None]:
        """Call ``recorder(expert_index, keep_mask, h)`` from every expert layer during the block (for routing stats)."""
        previous, self.router.recorder = self.router.recorder, recorder
        try:
            yield
        finally:
            self.router.recorder = previous

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[PreTrainedModel]:
        """The wrapped base model with its original Linear layers back in place (experts restored on exit)."""
        layers = self.expert_layers()
        for key, layer in layers.items():
            parent_name, _, child = key.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer.base_layer)
        try:
            yield self.model
        finally:
            for key, layer in layers.items():
                parent_name, _, child = key.rpartition(".")
                setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        expert_ids: torch.Tensor | int | None = None,
        task_ids: torch.Tensor | int | None = None,
        **kwargs: Any,
    ):
        """The base model's forward through the expert layers; ``expert_ids``/``task_ids`` feed oracle routing."""
        if expert_ids is not None and task_ids is not None:
            raise ValueError("pass expert_ids or task_ids, not both")
        with self.routed(expert_ids if expert_ids is not None else task_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------------------------------------------ build
    @classmethod
    def from_adapters(cls, base_model: PreTrainedModel | str, adapters: Any = None, **kwargs: Any):
        """Build from SO-LoRA adapters (dirs, Hub ids, ``SparseUpdate`` lists, PeftModels); see
        :func:`moe_router.builders.build_moe`."""
        # imported by name so that saving with remote code does not ship the builders (they need peft_sorlora)
        builders = importlib.import_module("moe_router.builders")
        return builders.build_moe(cls, base_model, adapters, **kwargs)

    # ---------------------------------------------------------------------------------------------------- storage
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        save_base: bool | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        card_info: Any = None,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json``, ``experts.safetensors`` and the ``README.md`` card (plus the base under ``base/`` if
        ``save_base``).

        ``save_base`` defaults to ``config.base_in_repo``; without it the base is referenced by
        ``config.base_model_name_or_path`` and must be loadable from there. ``card_info``: a
        :class:`model_cards.MoECardInfo` or a mapping of its fields (``results``, ``method``, ``communication``,
        ``test_size``, ...) that override what the model knows; an existing README.md there is updated, not replaced.
        """
        if push_to_hub:
            raise ValueError("use model.push_to_hub(repo_id, save_base=...) to upload")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, expected a directory")
        save_base = self.config.base_in_repo if save_base is None else bool(save_base)
        if not save_base and not self.config.base_model_name_or_path:
            raise ValueError(
                "the base model has no name or path to reference: set config.base_model_name_or_path or save_base=True"
            )
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.config.base_in_repo = save_base
        tensors: dict[str, torch.Tensor] = {}
        for key, layer in self.expert_layers().items():
            tensors.update(layer.experts().to_tensors(key))
        tensors.update({f"{ROUTER_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in self.router.tensors.items()})
        save_file(tensors, os.path.join(save_directory, EXPERTS_FILE), metadata={"format": FILE_FORMAT})
        if self._auto_class is not None:
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(self, save_directory, config=self.config)
        self.config.save_pretrained(save_directory)
        if save_base:
            with self.unwrapped() as base:
                base.save_pretrained(os.path.join(save_directory, BASE_SUBFOLDER))
        pending = getattr(self, "_pending_card", None) or {}
        card = self.model_card(pending.get("repo_id") or str(save_directory), card_info)
        if card is not None:
            path = os.path.join(save_directory, CARD_FILE)
            if pending and os.path.isfile(path):  # pushing: the repo's tags and the push's accumulate with ours
                existing = type(card).load(path).data.tags or []
                card.data.tags = list(
                    dict.fromkeys([*(card.data.tags or []), *existing, *(self.model_tags or []), *pending["tags"]])
                )
            elif pending:
                card.data.tags = list(
                    dict.fromkeys([*(card.data.tags or []), *(self.model_tags or []), *pending["tags"]])
                )
            importlib.import_module("model_cards").update_card_file(path, card)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        save_base: bool | None = None,
        card_info: Any = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Upload config, experts, the remote code and the card (and the base when ``save_base``) in one commit.

        Saved into a folder that holds the repo's current README.md, so the card is merged into it (user text kept);
        ``card_info`` as in :meth:`save_pretrained`, with the card naming ``repo_id``. Tags accumulate: the repo's,
        ``model_tags``, ``tags=``, ours. Uses ``huggingface_hub``'s public API (``model_cards.push_with_card``).
        """
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        try:
            publish = importlib.import_module("model_cards.publish")
        except ImportError as exc:
            raise ImportError(f"push_to_hub needs the model_cards package (pip install peft-sorlora): {exc}") from exc

        def save(folder: str, normalised_id: str) -> None:
            self._pending_card = {"repo_id": normalised_id, "tags": list(tags or [])}
            try:
                self.save_pretrained(folder, save_base=save_base, card_info=card_info)
            finally:
                self._pending_card = None

        base = self.config.base_model_name_or_path
        in_repo = self.config.base_in_repo if save_base is None else bool(save_base)
        if not in_repo and base and (os.path.isabs(base) or os.path.exists(base)):
            raise ValueError(
                f"the base model is referenced by the local path {base!r}, which no one else can load: name it by its "
                "Hub id (peft_sorlora.set_base_identity(base, 'owner/name') before building) or push with save_base=True"
            )
        previous = self.config.base_in_repo
        try:
            return publish.push_with_card(
                repo_id,
                save,
                token=token,
                private=private,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or "Upload implicit MoE",
                commit_description=commit_description,
            )
        finally:
            self.config.base_in_repo = previous

    def model_card(self, repo_id: str, card_info: Any = None) -> Any:
        """The MoE card (:func:`model_cards.moe_card`) for this model as repo ``repo_id``: base model, experts with
        their members' peers and tasks (where the expert descriptions carry them), router settings, and whatever
        ``card_info`` adds (see :meth:`save_pretrained`). None, with a warning, without ``model_cards`` or a base name.
        """
        try:
            cards = importlib.import_module("model_cards")
        except ImportError as exc:
            logger.warning("no model card written: model_cards is not importable (%s); install peft-sorlora", exc)
            return None
        if dataclasses.is_dataclass(card_info) and not isinstance(card_info, type):
            card_info = {f.name: getattr(card_info, f.name) for f in dataclasses.fields(card_info)}
        elif card_info is not None and not isinstance(card_info, Mapping):
            raise ValueError(f"card_info must be a MoECardInfo or a mapping of its fields, got {type(card_info)}")
        config = self.config
        base = config.base_model_name_or_path or _base_name(self.model)
        if not base and not (card_info or {}).get("base_model"):
            logger.warning("no model card written: the base model has no name (config.base_model_name_or_path)")
            return None
        experts = []
        for e, expert in enumerate(config.experts or []):
            members = expert.get("members") or []
            experts.append(
                cards.ExpertInfo(
                    cluster=expert.get("name", e),
                    peers=[m.get("peer") or m.get("source") or f"member-{i}" for i, m in enumerate(members)]
                    or [f"expert-{e}"],
                    tasks=[m["task"] for m in members if m.get("task")],
                )
            )
        fields: dict[str, Any] = {
            "repo_id": repo_id,
            "base_model": base,
            "experts": experts,
            "router_top_k": config.router_top_k,
            "refinement": config.refine,
            "router_settings": self._card_router_settings(),
            "results": {},
            "base_in_repo": bool(config.base_in_repo),
        }
        fields.update(card_info or {})
        pending = getattr(self, "_pending_card", None)
        if pending:  # a push names the repo it goes to, whatever card_info says
            fields["repo_id"] = pending["repo_id"]
        return cards.moe_card(cards.MoECardInfo(**fields))

    def _card_router_settings(self) -> dict[str, Any]:
        """The router as the card shows it: its name, its options, and what its centroids are (when it has any)."""
        settings: dict[str, Any] = {"routing": self.config.router}  # the card's row name, kept from before routers
        settings.update((self.config.router_options or {}).get(self.config.router, {}))
        mask = self.router.tensors.get("centroid_mask")
        if mask is not None:
            settings["centroids"] = (
                f"{int(mask.sum())} centroids over {int(mask.any(-1).sum())} experts: means of the members' prompts' "
                "mean-pooled hidden states on the bare base (statistics, not text)"
            )
        return settings

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: ImplicitMoEConfig | None = None,
        base_model: PreTrainedModel | None = None,
        revision: str | None = None,
        subfolder: str = "",
        **kwargs: Any,
    ):
        """Load from a local directory or a Hub repo: the config, the base model (by id, or ``base/``), the experts.

        Hub keywords (``token``, ``cache_dir``, ``local_files_only``, ...) apply to every download; others (``dtype``,
        ``device_map``, ...) go to the base model's ``from_pretrained``. ``base_model=`` supplies the base directly.
        """
        if model_args:
            raise ValueError(f"unexpected positional arguments {model_args!r}")
        for name in _AUTO_KWARGS:
            kwargs.pop(name, None)
        hub = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
        path = str(pretrained_model_name_or_path)
        if config is None:
            config = ImplicitMoEConfig.from_pretrained(path, revision=revision, subfolder=subfolder, **hub)
        if not isinstance(config, ImplicitMoEConfig) and getattr(config, "model_type", None) != "solora_moe":
            raise ValueError(f"{path!r} is not a solora_moe model (model_type {config.model_type!r})")
        if base_model is None:
            auto = getattr(transformers, cls.base_auto_class)
            if config.base_in_repo:
                base_sub = f"{subfolder}/{BASE_SUBFOLDER}" if subfolder else BASE_SUBFOLDER
                base_model = auto.from_pretrained(path, revision=revision, subfolder=base_sub, **hub, **kwargs)
            elif config.base_model_name_or_path:
                base_model = _load_named_base(cls, auto, config, path, hub, kwargs)
            else:
                raise ValueError(f"{path!r} names no base model and holds none: pass base_model=")
        experts_path = cached_file(path, EXPERTS_FILE, revision=revision, subfolder=subfolder, **hub)
        tensors = load_file(experts_path)
        router_tensors = {k[len(ROUTER_PREFIX) :]: tensors.pop(k) for k in list(tensors) if k.startswith(ROUTER_PREFIX)}
        experts = LayerExperts.from_tensors(tensors)
        return cls(config, base_model=base_model, experts=experts, router_tensors=router_tensors)


class ImplicitMoEForCausalLM(ImplicitMoEPreTrainedModel, GenerationMixin):
    """Implicit MoE over a causal LM; ``generate`` runs the base model's generation loop through the expert layers."""

    base_auto_class = "AutoModelForCausalLM"

    def generate(self, *args: Any, expert_ids: torch.Tensor | int | None = None, **kwargs: Any):
        """Generate with the wrapped model (its cache and generation config); ``expert_ids`` feed oracle routing."""
        task_ids = kwargs.pop("task_ids", None)
        with self.routed(expert_ids if expert_ids is not None else task_ids):
            return self.model.generate(*args, **kwargs)


class ImplicitMoEForSequenceClassification(ImplicitMoEPreTrainedModel):
    """Implicit MoE over a sequence classifier (the head is the base model's: save it with ``save_base=True``)."""

    base_auto_class = "AutoModelForSequenceClassification"


@torch.no_grad()
def routing_shares(
    model: ImplicitMoEPreTrainedModel, batch: Mapping[str, torch.Tensor], *, by: str = "count"
) -> torch.Tensor:
    """Share of the kept activations that go to each expert (tensor[E], sums to 1) over ``batch``'s real tokens.

    ``by="count"`` counts kept components per token (the router's choices); ``"magnitude"`` weighs them by ``|h|``.
    """
    if by not in ("count", "magnitude"):
        raise ValueError(f"by must be 'count' or 'magnitude', got {by!r}")
    totals = torch.zeros(model.num_experts, dtype=torch.float64)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    token_mask = inputs.get("attention_mask")

    def record(expert: torch.Tensor, keep: torch.Tensor, h: torch.Tensor) -> None:
        weight = keep.double() if by == "count" else (h.abs() * keep).double()
        if token_mask is not None and tuple(weight.shape[:-1]) == tuple(token_mask.shape):
            weight = weight * token_mask.to(weight.device).unsqueeze(-1).double()
        per_component = weight.reshape(-1, weight.shape[-1]).sum(0).cpu()
        totals.index_add_(0, expert.cpu(), per_component)

    was_training = model.training
    model.eval()
    try:
        with model.recording(record):
            model(**inputs)
    finally:
        model.train(was_training)
    total = totals.sum()
    if total <= 0:
        raise ValueError("no activations were kept: empty batch or all-zero inputs")
    return (totals / total).float()
