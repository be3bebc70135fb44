"""Tiny models shared by the SO-LoRA tests: a toy MLP, random Llama/Qwen2 causal LMs, a BERT-like classifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


class ToyMLP(nn.Module):
    """Two linear layers with a non-linearity; enough for PEFT's injection logic."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.lin0 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


@dataclass
class ModelCase:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[int], dict[str, torch.Tensor]]
    loss_fn: Callable[[Any, dict], torch.Tensor] | None
    target_modules: list[str]
    task_type: str | None
    modules_to_save: list[str] | None = None

    def output(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch)
        return out if isinstance(out, torch.Tensor) else out.logits


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(2)
    config = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def _lm_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _cls_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (3, 10), generator=g), "labels": torch.randint(0, 3, (3,), generator=g)}


def _mlp_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 32, generator=g)}


def _mlp_loss(out: torch.Tensor, batch: dict) -> torch.Tensor:
    return (out - 1.0).pow(2).mean()


def toy_mlp() -> ToyMLP:
    torch.manual_seed(3)
    return ToyMLP().eval()


CASES = [
    ModelCase("mlp", toy_mlp, _mlp_batch, _mlp_loss, ["lin0", "lin1"], None, ["head"]),
    ModelCase("llama", tiny_llama, _lm_batch, None, ["q_proj", "v_proj"], "CAUSAL_LM"),
    ModelCase("qwen2", tiny_qwen2, _lm_batch, None, ["q_proj", "k_proj", "v_proj", "o_proj"], "CAUSAL_LM"),
    ModelCase("bert", tiny_bert, _cls_batch, None, ["query", "value"], "SEQ_CLS", ["classifier"]),
]
