"""``SOLoRAModel``: PEFT's tuner that injects SO-LoRA layers into a base model."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .calibration import solora_layers
from .config import SOLoRAConfig
from .layer import MaskCalibration, SOLoRALayer, dispatch_default

__all__ = ["SOLoRAModel"]


class SOLoRAModel(BaseTuner):
    """Injects SO-LoRA into a transformers (or any torch) model; created by ``peft.get_peft_model``.

    Default target modules follow PEFT's LoRA mapping per architecture. While an adapter's masks are not frozen, its
    layers observe the first ``mask_calibration_steps`` training batches and then freeze the masks themselves
    (:class:`peft_sorlora.layer.MaskCalibration`), on every forward path, so plain loops, ``Trainer`` and a
    ``PeftModel`` without ``task_type`` all train without an explicit :func:`peft_sorlora.calibrate`.
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

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, then one shared :class:`MaskCalibration` for the new adapter's layers (if it observes)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        layers = [layer for layer in solora_layers(model, adapter_name) if adapter_name in layer.observations]
        if layers:
            group = MaskCalibration(adapter_name, self.peft_config[adapter_name], layers)
            for layer in layers:
                layer.observations[adapter_name].group = group

    def finalize_ready_masks(self) -> list[str]:
        """Freeze the masks of every adapter that has observed enough training batches; returns their names.

        The layers do this by themselves at their next forward; this is for code that wants it done now.
        """
        done = []
        for name in list(self.peft_config):
            layers = solora_layers(self.model, name)
            groups = {id(o.group): o.group for layer in layers if (o := layer.observations.get(name)) is not None}
            for group in groups.values():
                if group.ready():
                    group.freeze()
                    done.append(name)
        return done
