"""Configuration of a sparse-and-orthogonal LoRA (SO-LoRA) adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._registry import SOLORA

__all__ = ["SOLoRAConfig", "PROJECTIONS", "SPARSITY_ALLOCATIONS", "PAYLOAD_DTYPES"]

PROJECTIONS = ("orthogonal", "gaussian")
SPARSITY_ALLOCATIONS = ("uniform", "spectral_entropy")
PAYLOAD_DTYPES = ("float32", "float16", "bfloat16")
_BIASES = ("none", "all", "solora_only")


@dataclass
class SOLoRAConfig(PeftConfig):
    """Configuration of an SO-LoRA adapter: ΔW = scale · (B ⊙ M) A with a frozen A and a sparse trainable B.

    A is a deterministic function of ``(projection, projection_seed, slot, layer)``, so peers exchange the seed,
    never the matrix. The mask M keeps a ``sparsity`` fraction of B's entries (the global budget), chosen by
    :func:`peft_sorlora.calibrate` (or automatically during the first ``mask_calibration_steps`` training batches)
    and frozen afterwards.
    """

    r: int = field(default=8, metadata={"help": "Rank of the adapter (rows of A, columns of B)."})
    lora_alpha: float = field(
        default=16, metadata={"help": "Scaling numerator: the update is scaled by lora_alpha / r."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt. None uses PEFT's LoRA defaults for the architecture; "
            "'all-linear' adapts every linear layer except the output head."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Module names or regex to skip."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the base layer stores W transposed (GPT-2 Conv1D)."}
    )
    projection: Literal["orthogonal", "gaussian"] = field(
        default="orthogonal",
        metadata={
            "help": "'orthogonal': rows slot*r..(slot+1)*r of a random orthogonal basis shared through "
            "projection_seed, so A_i A_j^T = 0 exactly between slots. 'gaussian': the paper's i.i.d. N(0, 1/in) "
            "draw per (seed, slot, layer), nearly orthogonal in high dimension."
        },
    )
    projection_seed: int = field(default=0, metadata={"help": "Seed shared by the peers that must be orthogonal."})
    slot: int = field(default=0, metadata={"help": "This device's block of A (orthogonal) or its draw (gaussian)."})
    sparsity: float = field(default=0.5, metadata={"help": "Global fraction of B entries kept, in (0, 1]."})
    sparsity_allocation: Literal["uniform", "spectral_entropy"] = field(
        default="uniform",
        metadata={"help": "How the budget is spread over layers: same fraction everywhere, or by spectral entropy."},
    )
    mask_calibration_steps: int = field(
        default=1, metadata={"help": "Batches whose B gradients (and inputs) are observed before the mask freezes."}
    )
    covariance_damping: float = field(
        default=1e-2, metadata={"help": "λ in C + λ·mean(diag C)·I for the data-aware spectrum (keeps C invertible)."}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: B starts at 0 (the adapter is a no-op)."})
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'solora_only': which biases train."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full."}
    )
    payload_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of B values in exchanged sparse updates."}
    )
    layer_sparsity: dict[str, float] | None = field(
        default=None,
        metadata={"help": "Filled by calibration: kept fraction per layer key. Set means the masks are frozen."},
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SOLORA
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its allowed range for any invalid value."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if not isinstance(self.slot, int) or self.slot < 0:
            raise ValueError(f"slot must be an integer >= 0, got {self.slot!r}")
        if not isinstance(self.projection_seed, int) or self.projection_seed < 0:
            raise ValueError(f"projection_seed must be an integer >= 0, got {self.projection_seed!r}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 < self.sparsity <= 1.0):
            raise ValueError(f"sparsity must be in (0, 1], got {self.sparsity!r}")
        if self.sparsity_allocation not in SPARSITY_ALLOCATIONS:
            raise ValueError(
                f"sparsity_allocation must be one of {SPARSITY_ALLOCATIONS}, got {self.sparsity_allocation!r}"
            )
        if not isinstance(self.mask_calibration_steps, int) or self.mask_calibration_steps < 1:
            raise ValueError(f"mask_calibration_steps must be an integer >= 1, got {self.mask_calibration_steps!r}")
        if not self.covariance_damping > 0:
            raise ValueError(f"covariance_damping must be > 0, got {self.covariance_damping!r}")
        if self.bias not in _BIASES:
            raise ValueError(f"bias must be one of {_BIASES}, got {self.bias!r}")
        if self.payload_dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"payload_dtype must be one of {PAYLOAD_DTYPES}, got {self.payload_dtype!r}")
        if self.layer_sparsity is not None:
            bad = {k: v for k, v in self.layer_sparsity.items() if not 0.0 < float(v) <= 1.0}
            if bad:
                raise ValueError(f"layer_sparsity values must be in (0, 1], got {bad}")

    def check_slot(self, in_features: int, layer_key: str) -> None:
        """Orthogonal mode holds ⌊in_features / r⌋ slots per layer; refuse a slot beyond that."""
        if self.projection != "orthogonal":
            return
        capacity = in_features // self.r
        if self.slot >= capacity:
            raise ValueError(
                f"slot must be in [0, {capacity - 1}] for layer {layer_key!r} (in_features={in_features}, r={self.r}: "
                f"⌊in_features/r⌋ = {capacity} orthogonal slots), got {self.slot}"
            )
