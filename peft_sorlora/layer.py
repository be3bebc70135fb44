"""SO-LoRA layers: ``y = base(x) + scale · (B ⊙ M)(A x)`` with A a frozen buffer and B trained only on the mask M."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SOLoRAConfig
from .masks import freeze_masks
from .projection import projection_matrix

__all__ = ["SOLoRALayer", "Linear", "Observation", "MaskCalibration", "dispatch_default"]

logger = logging.getLogger("peft_sorlora")


class MaskCalibration:
    """The automatic mask calibration of one adapter, shared by all the layers that carry it.

    While an adapter's masks are not frozen, each of its layers observes every forward with gradients (the B
    gradient in backward, the input when the budget is spectral) and passes a zero gradient on, so B does not move.
    The first forward of any layer after ``mask_calibration_steps`` observed batches (backward passes) freezes the
    masks of all the layers at once; training then moves the masked entries of B. Because this happens inside the
    layers, it works on every forward path: ``PeftModel`` with or without ``task_type`` (which calls the base model
    directly), ``transformers.Trainer``, accelerate, a plain loop. The tuner links the layers of an adapter to one
    instance after injection (:meth:`peft_sorlora.SOLoRAModel.inject_adapter`); a layer used alone has its own.
    """

    def __init__(self, adapter_name: str, config: SOLoRAConfig, layers: list[SOLoRALayer] | None = None) -> None:
        self.adapter_name = adapter_name
        self.config = config
        self.layers: list[SOLoRALayer] = list(layers or [])
        self.auto = True  # False while calibrate() drives the observation itself
        self.announced = False

    def ready(self) -> bool:
        """True once every layer has observed ``mask_calibration_steps`` batches."""
        steps = self.config.mask_calibration_steps
        observations = [layer.observations.get(self.adapter_name) for layer in self.layers]
        return bool(observations) and all(o is not None and o.steps >= steps for o in observations)

    def announce(self) -> None:
        """Tell a training user, once, that the first batches observe (Trainer logs ``grad_norm 0`` for them)."""
        if self.announced:
            return
        self.announced = True
        logger.warning(
            "SO-LoRA adapter %r: the first %d training batch(es) observe B's gradients to choose the sparse masks "
            "(B does not move, grad_norm is 0); training moves the masked entries of B after that. Call "
            "peft_sorlora.calibrate(model, batches) before training to choose them up front.",
            self.adapter_name,
            self.config.mask_calibration_steps,
        )

    def _pool_across_processes(self) -> None:
        """Under ``torch.distributed`` (DDP, accelerate, Trainer on several processes) sum the observations of all
        ranks first, so every rank freezes the same masks (each saw only its shard of the batches)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for layer in self.layers:
            observation = layer.observations[self.adapter_name]
            torch.distributed.all_reduce(observation.grad_sum)
            if observation.collect_inputs:
                tokens = torch.tensor([float(observation.num_tokens)], dtype=torch.float64)
                torch.distributed.all_reduce(tokens)
                torch.distributed.all_reduce(observation.second_moment)
                observation.num_tokens = int(tokens.item())

    def freeze(self) -> dict[str, float]:
        """Freeze the masks of every layer of the adapter; returns the kept fraction per layer."""
        self._pool_across_processes()
        fractions = freeze_masks(self.layers, self.adapter_name, self.config)
        kept = sum(int(layer.solora_mask[self.adapter_name].sum()) for layer in self.layers)
        total = sum(layer.solora_mask[self.adapter_name].numel() for layer in self.layers)
        logger.info(
            "SO-LoRA adapter %r: masks frozen after %d batch(es); %d of %d B entries train (%.1f%%)",
            self.adapter_name,
            self.config.mask_calibration_steps,
            kept,
            total,
            100.0 * kept / max(total, 1),
        )
        return fractions


class Observation:
    """Statistics gathered before the mask freezes: accumulated B gradients and (optionally) input covariance.

    The accumulated gradient ``G`` ranks B's entries (B after SGD from 0 is ``-lr·G``, so ``|G|`` is "B's magnitude
    after the first mini-batches"); the input second moment feeds the data-aware spectrum of the layer budget.
    """

    def __init__(self, collect_inputs: bool, group: MaskCalibration) -> None:
        self.group = group
        self.grad_sum: torch.Tensor | None = None
        self.steps = 0
        self.collect_inputs = collect_inputs
        self.second_moment: torch.Tensor | None = None
        self.num_tokens = 0

    def add_grad(self, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        self.grad_sum = g.clone() if self.grad_sum is None else self.grad_sum + g
        self.steps += 1

    def add_input(self, x: torch.Tensor) -> None:
        if not self.collect_inputs:
            return
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        moment = flat.T @ flat
        self.second_moment = moment if self.second_moment is None else self.second_moment + moment
        self.num_tokens += flat.shape[0]


class _ObserveGrad(torch.autograd.Function):
    """Identity on B whose backward records B's gradient and passes 0 on, so B does not move while observed."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, observation: Observation) -> torch.Tensor:  # type: ignore[override]
        ctx.observation = observation
        return b.view_as(b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.observation.add_grad(grad)
        return torch.zeros_like(grad), None


class SOLoRALayer(BaseTunerLayer):
    """Adapter state of one base layer, per adapter name: frozen A, trainable B, boolean mask, scaling."""

    adapter_layer_names = ("solora_B",)
    # ``observations``: per-adapter calibration state, listed so that delete_adapter removes it with the rest
    other_param_names = ("solora_A", "solora_mask", "r", "scaling", "solora_dropout", "observations")

    def __init__(self, base_layer: nn.Module, layer_key: str = "", **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.solora_dropout = nn.ModuleDict({})
        self.solora_A = BufferDict({}, persistent=True)
        self.solora_B = nn.ParameterDict({})
        self.solora_mask = BufferDict({}, persistent=True)
        self.observations: dict[str, Observation] = {}
        self.layer_key = layer_key
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        if None in (self.in_features, self.out_features):
            raise TypeError(f"SO-LoRA supports Linear and Conv1D layers, got {type(self.get_base_layer())}")
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: SOLoRAConfig, inference_mode: bool = False, **kwargs) -> None:
        """Create adapter ``adapter_name`` on this layer from ``config`` (A derived from seed and slot)."""
        config.check_slot(self.in_features, self.layer_key)
        r = config.r
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.lora_alpha / r
        self.solora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.solora_A[adapter_name] = projection_matrix(
            projection=config.projection,
            seed=config.projection_seed,
            slot=config.slot,
            r=r,
            in_features=self.in_features,
            layer_key=self.layer_key,
        )
        weight = torch.zeros(self.out_features, r)
        if not config.init_weights:
            generator = torch.Generator().manual_seed(config.projection_seed * 7919 + config.slot)
            weight = torch.randn(self.out_features, r, generator=generator) * 0.1
        self.solora_B[adapter_name] = nn.Parameter(weight)
        self.solora_mask[adapter_name] = torch.ones(self.out_features, r, dtype=torch.bool)
        if config.layer_sparsity is None:
            self.observations[adapter_name] = Observation(
                collect_inputs=config.sparsity_allocation == "spectral_entropy",
                group=MaskCalibration(adapter_name, config, [self]),
            )
        else:
            self.observations.pop(adapter_name, None)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Freeze the mask of ``adapter_name``: entries outside it are zeroed and never train again."""
        expected = (self.out_features, self.r[adapter_name])
        if tuple(mask.shape) != expected or mask.dtype != torch.bool:
            raise ValueError(
                f"mask for {self.layer_key!r} must be bool {expected}, got {mask.dtype} {tuple(mask.shape)}"
            )
        b = self.solora_B[adapter_name]
        self.solora_mask[adapter_name] = mask.to(b.device)
        with torch.no_grad():
            b.mul_(self.solora_mask[adapter_name])
        self.observations.pop(adapter_name, None)

    def _observation(self, adapter_name: str) -> Observation | None:
        """The adapter's observation, or None once its masks are frozen (freezing them first when it is time)."""
        observation = self.observations.get(adapter_name)
        if observation is None:
            return None
        group = observation.group
        if group.auto and observation.steps >= group.config.mask_calibration_steps and group.ready():
            group.freeze()
            return None
        return observation

    def effective_B(self, adapter_name: str) -> torch.Tensor:
        """B ⊙ M, the matrix that multiplies ``A x``."""
        return self.solora_B[adapter_name] * self.solora_mask[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = scale · (B ⊙ M) A, shaped like the base weight."""
        b = self.effective_B(adapter_name)
        a = self.solora_A[adapter_name]
        dtype = b.dtype
        cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        delta = (b.float() @ a.float()) if cast else (b @ a.to(dtype))
        delta = delta * self.scaling[adapter_name]
        return transpose(delta.to(dtype), getattr(self, "fan_in_fan_out", False))

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """SO-LoRA is additive (W + ΔW), so ``peft.save_as_lora`` exports it exactly at equal rank."""
        return True

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale


class Linear(nn.Module, SOLoRALayer):
    """SO-LoRA on a ``torch.nn.Linear`` (or a transformers ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SOLoRAConfig, layer_key: str = "", **kwargs):
        super().__init__()
        SOLoRALayer.__init__(self, base_layer, layer_key=layer_key, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' ΔW into the base weight (``safe_merge`` checks for NaN/Inf first)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.solora_B:
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ΔW from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.solora_B:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.solora_B:
                continue
            a = self.solora_A[name]
            b = self.solora_B[name]
            observation = self._observation(name)
            if observation is not None and torch.is_grad_enabled() and b.requires_grad:
                if self.training:
                    observation.group.announce()
                observation.add_input(x)
                b = _ObserveGrad.apply(b, observation)
            hidden = F.linear(self.solora_dropout[name](x.to(a.dtype)), a)
            result = result + F.linear(hidden, b * self.solora_mask[name]).to(result_dtype) * self.scaling[name]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "solora." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: SOLoRAConfig, layer_key: str, **kwargs):
    """Wrap a Linear/Conv1D ``target`` in an SO-LoRA layer, or return None if the type is unsupported."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but the target is nn.Linear; setting it to False.", stacklevel=2)
            config.fan_in_fan_out = False
    elif isinstance(base, Conv1D):
        if not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=False but the target is Conv1D; setting it to True.", stacklevel=2)
            config.fan_in_fan_out = True
    else:
        return None
    return Linear(target, adapter_name, config, layer_key=layer_key, **kwargs)
