"""Tokenization for training and scoring, as lm-evaluation-harness does it (context and continuation ids)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .examples import Example

__all__ = [
    "collate_for_training",
    "context_continuation_ids",
    "encode_for_training",
    "n_special_prefix",
    "truncate_context",
]


def context_continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval computes them: tokens(context+continuation) minus
    tokens(context), with the context's trailing spaces moved onto the continuation; special tokens the tokenizer
    adds (e.g. BOS) stay at the front of the context."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    if whole[: len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids) :]
    # Merge across the boundary: fall back to separate encodings (continuation without special tokens).
    return context_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def n_special_prefix(tokenizer: Any) -> int:
    """How many special tokens (e.g. BOS) the tokenizer puts in front of every text."""
    return len(tokenizer("", add_special_tokens=True)["input_ids"])


def truncate_context(context_ids: list[int], *, budget: int, n_special: int) -> list[int]:
    """Cut a context from the left to ``budget`` tokens, keeping the ``n_special`` leading special tokens."""
    if budget <= n_special:
        raise ValueError(f"max_len leaves {budget} context tokens, need more than {n_special} special tokens")
    if len(context_ids) <= budget:
        return context_ids
    return context_ids[:n_special] + context_ids[len(context_ids) - (budget - n_special) :]


def encode_for_training(example: Example, tokenizer: Any, *, max_len: int) -> dict[str, list[int]]:
    """Encode prompt + correct answer for causal-LM training: loss only on the answer (prompt labels are -100);
    the prompt is cut from the left so that the answer always fits in ``max_len`` tokens."""
    context_ids, answer_ids = context_continuation_ids(tokenizer, example.prompt, example.answer)
    if len(answer_ids) >= max_len:
        raise ValueError(f"answer of {len(answer_ids)} tokens does not fit in max_len={max_len}")
    context_ids = truncate_context(context_ids, budget=max_len - len(answer_ids), n_special=n_special_prefix(tokenizer))
    return {
        "input_ids": context_ids + answer_ids,
        "labels": [-100] * len(context_ids) + answer_ids,
        "attention_mask": [1] * (len(context_ids) + len(answer_ids)),
    }


def collate_for_training(encoded: Sequence[dict[str, list[int]]], *, pad_token_id: int) -> dict[str, Any]:
    """Right-pad encoded examples into a batch of tensors (padding gets label -100 and attention 0)."""
    import torch  # noqa: PLC0415 - keep the data registry importable without loading torch

    if not encoded:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in encoded)

    def pad(key: str, value: int) -> Any:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in encoded], dtype=torch.long)

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "labels": pad("labels", -100),
        "attention_mask": pad("attention_mask", 0),
    }
