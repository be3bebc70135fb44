"""Loading the frozen base model: :func:`load_base` is the one loader (a device, the simulation, the CLI).

The real base models (the bundled SmolLM2, Hub ids, local folders) load through
:func:`peft_sorlora.base_model.load_base_model`; a name starting with ``tiny-random`` is the tiny random Llama with a
byte-level tokenizer of tests and quick simulations (no download of any kind). :func:`hosted_base` fetches the copy
of a collaboration's base that ``sorlora collab create --host-base`` put on its own hub, for a member with no other
way to it (a lab without the Hub); whatever it loads is checked against the pinned fingerprint by the caller.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_sorlora.base_model import BUNDLED_BASE_ID, load_base_model, set_base_identity

__all__ = [
    "TINY_BASE_ID",
    "byte_level_tokenizer",
    "hosted_base",
    "is_tiny_random",
    "load_base",
    "tiny_random_model",
]

TINY_BASE_ID = "tiny-random-llama"  # the tiny random Llama of tests and quick simulations (seed 0)


def is_tiny_random(name: str | None) -> bool:
    """Whether a model name (a setting, a pinned base id) names the tiny random Llama."""
    return name is not None and name.startswith("tiny-random")


def load_base(base_model: str | None = None, *, model: str | None = None) -> tuple[torch.nn.Module, Any, str]:
    """The frozen base model: ``(model, tokenizer, portable base id)``.

    ``base_model`` is the portable identity a collaboration pins (a Hub id, the bundled model's id, or
    :data:`TINY_BASE_ID`); the weights come from ``model`` (a local folder or Hub id) when given, else from
    ``base_model`` itself, else the bundled SmolLM2. A pinned ``base_model`` names the loaded model (what PEFT then
    records); without one the model keeps its own name (the bundled id when it has none).
    """
    source = model if model is not None else (None if base_model == BUNDLED_BASE_ID else base_model)
    tiny = is_tiny_random(source)
    if tiny:
        net, tokenizer = tiny_random_model(seed=0)
        loaded = TINY_BASE_ID
    else:
        net, tokenizer = load_base_model(source)
        loaded = net.name_or_path or BUNDLED_BASE_ID
    base_id = base_model or loaded
    if base_model is not None or tiny:
        set_base_identity(net, base_id)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, tokenizer, base_id


def hosted_base(hub: Any, repo_id: str, folder: str | os.PathLike[str]) -> str:
    """``folder`` holding every file of the hosted base repo ``repo_id`` at its current commit, fetched through
    ``hub`` (its cache; each file linked, or copied where links are not possible): a local copy for
    ``load_base(base_model, model=folder)``. Only names the hub accepts as paths are written, inside ``folder``."""
    folder = Path(folder)
    sha = hub.resolve(repo_id)
    for name in hub.list_files(repo_id, revision=sha):
        source = hub.download(repo_id, name, revision=sha)  # validates the name first: no ../, no absolute path
        target = folder / name
        if target.is_file() and target.stat().st_size == Path(source).stat().st_size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            target.symlink_to(Path(source).resolve())
        except OSError:
            shutil.copyfile(source, target)
    return str(folder)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>) that needs no vocabulary download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: PLC0415

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for symbol in sorted(byte_alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_random_model(
    *, hidden_size: int = 32, num_hidden_layers: int = 2, seed: int = 0
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random Llama (for tests) with the byte-level tokenizer: same code paths as SmolLM2, instant to run."""
    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
