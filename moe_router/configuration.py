"""Configuration of the implicit mixture of SO-LoRA experts (``model_type = "solora_moe"``).

This module imports only transformers and torch (through :mod:`moe_router.routers`, where the router names live) so
that it can travel to the Hub as remote code.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .routers import ROUTER_ALIASES, ROUTERS, check_router_options, resolve_router_name

__all__ = ["ImplicitMoEConfig", "ROUTING_MODES", "REFINE_MODES", "EXPERTS_FILE", "BASE_SUBFOLDER"]

ROUTING_MODES = (*ROUTERS, *ROUTER_ALIASES)  # every accepted router name (registered names, then old aliases)
REFINE_MODES = ("task_stats", "routing", "none")
EXPERTS_FILE = "experts.safetensors"
BASE_SUBFOLDER = "base"


def check_router_settings(router_top_k: Any, routing: str, refine: str) -> int | None:
    """Validate the router options (raise ``ValueError`` naming the bad one); returns the normalised ``router_top_k``."""
    resolve_router_name(routing)
    if refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
    return check_router_top_k(router_top_k)


def check_router_top_k(value: Any) -> int | None:
    """``None``/``"all"`` keep every component (plain sum); otherwise a positive integer; anything else raises."""
    if value is None or value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"router_top_k must be a positive integer, None or 'all' (keep every component), got {value!r}"
        )
    return value


class ImplicitMoEConfig(PreTrainedConfig):
    """Settings of an :class:`~moe_router.ImplicitMoEForCausalLM`: which base model, which layers carry experts, router.

    ``router``: the router's name, one of :data:`moe_router.routers.ROUTERS` (``implicit``, ``sum``, ``average``,
    ``hard``, ``sequence``, ``spectral``; ``oracle`` is accepted as the old name of ``hard``). ``routing`` is the old
    name of this field: either may be given (they must agree), both are saved, equal. ``router_options``: router name
    -> that router's options (e.g. ``{"sequence": {"choose": 1}, "spectral": {"granularity": "token"}}``), kept for
    every router so that switching routers loses nothing. ``router_top_k``: components kept per token and layer,
    ranked by ``|A_refined x|`` (over all experts for ``implicit``, inside the chosen experts for ``sequence`` and
    ``spectral``; ``None`` = all). ``refine``: ``task_stats`` multiplies each member's A by its task gain (see
    :mod:`moe_router.layer`; Eq. 26 read literally), ``routing`` ranks components by the refined projection but keeps
    the kept components' trained values ``A x`` (the task statistics only route), ``none`` uses the frozen A as
    trained for both.
    ``target_layers``: layer key -> ``[out_features, in_features, components]``. ``experts``: one description per
    expert (name and members' projection, seed, slot, rank, alpha, source). The base weights are referenced through
    ``base_model_name_or_path``; ``base_in_repo`` says they were saved in the ``base/`` subfolder instead.
    ``base_fingerprint``: the base weights' fingerprint (``peft_sorlora.base_fingerprint``), when known: loading
    uses the bundled copy of the base when the named one cannot be fetched and the fingerprints agree.
    """

    model_type = "solora_moe"

    base_model_name_or_path: str | None = None
    base_model_type: str | None = None
    base_in_repo: bool = False
    base_fingerprint: str | None = None
    target_layers: dict[str, list[int]] | None = None
    experts: list[dict[str, Any]] | None = None
    router_top_k: int | None = None
    router: str | None = None
    routing: str | None = None
    router_options: dict[str, dict[str, Any]] | None = None
    refine: str = "none"

    def __post_init__(self, **kwargs: Any) -> None:
        names = {resolve_router_name(v) for v in (self.router, self.routing) if v is not None}
        if len(names) > 1:
            raise ValueError(f"router={self.router!r} and routing={self.routing!r} disagree: give one of them")
        self.router = self.routing = names.pop() if names else "implicit"
        self.router_options = check_router_options(self.router_options)
        self.router_top_k = check_router_settings(self.router_top_k, self.router, self.refine)
        for key, shape in (self.target_layers or {}).items():
            if len(shape) != 3 or any(int(v) <= 0 for v in shape):
                raise ValueError(f"target_layers[{key!r}] must be [out_features, in_features, components], got {shape}")
        super().__post_init__(**kwargs)

    @property
    def num_experts(self) -> int:
        """Number of experts (clusters) served."""
        return len(self.experts or [])
