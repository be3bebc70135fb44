"""``SOLoRAModel``: PEFT's tuner that injects SO-LoRA layers into a base model."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .calibration import finalize_masks, solora_layers
from .config import SOLoRAConfig
from .layer import SOLoRALayer, dispatch_default

__all__ = ["SOLoRAModel"]


class SOLoRAModel(BaseTuner):
    """Injects SO-LoRA into a transformers (or any torch) model; created by ``peft.get_peft_model``.

    Default target modules follow PEFT's LoRA mapping per architecture. While an adapter's masks are not frozen,
    each training forward first checks whether ``mask_calibration_steps`` batches were observed and, if so, freezes
    the masks (so plain training loops and ``Trainer`` work without an explicit :func:`peft_sorlora.calibrate`).
    """

    prefix: str = "solora_"
    tuner_layer_cls = SOLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        peft_config: SOLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, SOLoRALayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = dispatch_default(target, adapter_name, peft_config, layer_key=current_key)
        if new_module is None:
            raise ValueError(
                f"Target module {target} is not supported by SO-LoRA: only torch.nn.Linear and transformers Conv1D are."
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def finalize_ready_masks(self) -> list[str]:
        """Freeze the masks of every adapter that has observed enough training batches; returns their names."""
        done = []
        for name, config in self.peft_config.items():
            if config.layer_sparsity is not None:
                continue
            layers = solora_layers(self.model, name)
            observations = [layer.observations.get(name) for layer in layers]
            if observations and all(o is not None and o.steps >= config.mask_calibration_steps for o in observations):
                finalize_masks(self.model, name, config)
                done.append(name)
        return done

    def forward(self, *args, **kwargs):
        if self.training:
            self.finalize_ready_masks()
        return self.model.forward(*args, **kwargs)
