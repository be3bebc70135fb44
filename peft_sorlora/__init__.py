"""peft_sorlora: sparse-and-orthogonal LoRA (SO-LoRA) as a PEFT adapter type.

``import peft_sorlora`` registers the ``solora`` method with PEFT, after which the usual calls work::

    import peft_sorlora
    from peft import get_peft_model
    model = get_peft_model(base, peft_sorlora.SOLoRAConfig(r=8, sparsity=0.5, projection="orthogonal", slot=3))
    # train as usual: the first ``mask_calibration_steps`` batches observe and freeze the sparse masks (on every
    # forward path), or call peft_sorlora.calibrate(model, batches) first to choose them up front

This package knows nothing of how updates travel; :func:`get_sparse_update` / :func:`apply_sparse_update` give the
masked B values as self-describing safetensors payloads for whoever moves them.
"""

from ._registry import SOLORA, register
from .base_model import BUNDLED_BASE_ID, base_fingerprint, load_base_model, set_base_identity
from .calibration import allocate_budget, calibrate, finalize_masks, spectral_entropy, trainable_entries
from .collision import collision_rate
from .config import SOLoRAConfig
from .exchange import (
    PayloadError,
    SparseUpdate,
    apply_sparse_update,
    config_fingerprint,
    get_sparse_update,
    update_stats,
)
from .hub import install as install_hub_integration
from .hub import portable_base_id
from .layer import Linear, MaskCalibration, SOLoRALayer
from .model import SOLoRAModel
from .projection import projection_matrix

register(SOLoRAConfig, SOLoRAModel)
install_hub_integration()

__version__ = "0.1.0"

__all__ = [
    "SOLORA",
    "SOLoRAConfig",
    "SOLoRAModel",
    "SOLoRALayer",
    "Linear",
    "calibrate",
    "finalize_masks",
    "trainable_entries",
    "MaskCalibration",
    "allocate_budget",
    "spectral_entropy",
    "collision_rate",
    "projection_matrix",
    "SparseUpdate",
    "PayloadError",
    "get_sparse_update",
    "apply_sparse_update",
    "config_fingerprint",
    "update_stats",
    "load_base_model",
    "base_fingerprint",
    "set_base_identity",
    "BUNDLED_BASE_ID",
    "portable_base_id",
]
