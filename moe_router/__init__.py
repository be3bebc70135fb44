"""moe_router: every cluster's SO-LoRA experts served together in one model, routed with no trained router.

``import moe_router`` registers ``model_type = "solora_moe"`` with ``AutoConfig``, ``AutoModelForCausalLM`` and
``AutoModelForSequenceClassification``, so saved models (local or on the Hub) load with the Auto classes; the classes
are also registered for remote code, so ``save_pretrained`` ships the modeling files for users without this package::

    import moe_router
    moe = moe_router.ImplicitMoEForCausalLM.from_adapters(base, adapters=[dir_a, dir_b], calibration={0: [...], 1: [...]})
    moe.save_pretrained("out")       # config.json + experts.safetensors; the base is referenced by id
    AutoModelForCausalLM.from_pretrained("out")

Routers (:mod:`moe_router.routers`, ``ROUTERS``): ``implicit`` (the paper), ``sum``, ``average``, ``hard`` (by task id),
``sequence`` (per prompt, by centroids of the members' pooled hidden states: :func:`sequence_centroids`) and
``spectral`` (data-free, from the SVD of each expert's ΔW); pick one with ``router=`` when building,
``moe.set_router(router=...)`` later, or ``config.router``. :func:`routing_diagnostics` measures how well a router
sends each task's prompts to the task's cluster.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from .baselines import COMPARISON_MODES, arrow_model, comparison_mode, export_lora, export_loras
from .builders import Member, build_moe, load_members, member_from_update, read_adapter, task_statistics
from .centroids import add_gaussian_noise, first_layer, gaussian_sigma, kmeans, pooled_hidden_states, sequence_centroids
from .configuration import ImplicitMoEConfig
from .diagnostics import RoutingDiagnostics, prompt_shares, routing_diagnostics
from .layer import ImplicitMoELinear, LayerExperts, task_gain
from .modeling import (
    ImplicitMoEForCausalLM,
    ImplicitMoEForSequenceClassification,
    ImplicitMoEPreTrainedModel,
    routing_shares,
)
from .routers import ROUTERS, Router, make_router, resolve_router_name

AutoConfig.register(ImplicitMoEConfig.model_type, ImplicitMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(ImplicitMoEConfig, ImplicitMoEForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ImplicitMoEConfig, ImplicitMoEForSequenceClassification, exist_ok=True)
ImplicitMoEConfig.register_for_auto_class()
ImplicitMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ImplicitMoEForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ImplicitMoEConfig",
    "ImplicitMoEPreTrainedModel",
    "ImplicitMoEForCausalLM",
    "ImplicitMoEForSequenceClassification",
    "ImplicitMoELinear",
    "LayerExperts",
    "Member",
    "task_gain",
    "task_statistics",
    "routing_shares",
    "routing_diagnostics",
    "RoutingDiagnostics",
    "prompt_shares",
    "ROUTERS",
    "Router",
    "make_router",
    "resolve_router_name",
    "sequence_centroids",
    "pooled_hidden_states",
    "first_layer",
    "kmeans",
    "gaussian_sigma",
    "add_gaussian_noise",
    "build_moe",
    "load_members",
    "member_from_update",
    "read_adapter",
    "COMPARISON_MODES",
    "comparison_mode",
    "export_lora",
    "export_loras",
    "arrow_model",
]
