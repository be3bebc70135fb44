"""A workspace: one frozen base model in memory holding the adapters of one collaboration's members; peers take turns.

A peer's state is its *view*: the adapter values it holds (its own, plus its cluster members' for SO-LoRA cluster
methods). Before a peer trains or is evaluated its view is loaded into the workspace, so many peers share one base
model (100 peers fit in 24 GiB: each extra peer costs only its adapter) and a separate process runs the same code
with a workspace of its own. What an adapter is (config, payload) is the adapter kind's business
(:mod:`sorlora.methods.kinds`); the workspace only holds them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from peft import PeftModel, get_peft_model

from peft_sorlora import calibrate
from peft_sorlora.projection import derive_seed

from ..methods.kinds import AdapterKind
from .precision import autocast

__all__ = ["Workspace", "adapter_name", "answer_loss", "peer_of"]

View = dict[str, object]  # adapter name -> SparseUpdate (SO-LoRA) or DenseUpdate (LoRA)


def adapter_name(index: int) -> str:
    """The adapter name of the member with index ``index`` in the plan (its place among the sorted peer ids)."""
    return f"peer{index:02d}"


def answer_loss(network: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of ``batch`` (mean cross-entropy of the tokens whose label is not -100), computing the
    output layer only at the positions that predict a labelled token.

    Mathematically the ``outputs.loss`` of ``network(**batch)``; but a training example's prompt carries no labels,
    and the output layer over the whole vocabulary at every prompt position is about a quarter of a SmolLM2 train
    step (measured 3.8 s -> 2.8 s per step of batch 8 x 96 tokens). The positions kept are those where any row has
    a label next (transformers' ``logits_to_keep`` with indices), so the model's own logit processing still
    applies. A model whose forward takes no ``logits_to_keep`` gets the plain ``outputs.loss``.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "logits_to_keep" not in inspect.signature(type(network).forward).parameters:
        return network(**batch).loss
    targets = labels[:, 1:]
    positions = (targets != -100).any(dim=0).nonzero().squeeze(1)
    if positions.numel() == 0:
        raise ValueError("a training batch without any labelled token: nothing to learn from")
    logits = network(**inputs, logits_to_keep=positions).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets[:, positions].reshape(-1), ignore_index=-100
    )


def peer_of(name: str) -> int:
    """The member index of an adapter name made by :func:`adapter_name`."""
    if not name.startswith("peer") or not name[4:].isdigit():
        raise ValueError(f"not a peer adapter name: {name!r}")
    return int(name[4:])


class Workspace:
    """The base model with one adapter per member for one collaboration (see module docstring)."""

    def __init__(self, base_model: torch.nn.Module, base_model_id: str, terms: Any, kind: AdapterKind):
        self.base = base_model
        self.base_model_id = base_model_id
        self.terms = terms
        self.kind = kind
        self.model: PeftModel | None = None

    # ------------------------------------------------------------------ set-up
    def adapter_config(self, index: int):
        """The adapter config of member ``index``."""
        return self.kind.peft_config(self.terms, slot=index, base_model=self.base_model_id)

    def add_adapter(self, name: str, index: int) -> None:
        """Create adapter ``name`` for member ``index`` (a dense LoRA's random A is drawn from a per-member seed)."""
        config = self.adapter_config(index)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.terms.seed, "adapter", self.kind.init_slot(index)) % 2**31)
            if self.model is None:
                with warnings.catch_warnings():  # PEFT reads transformers' deprecated alias: nothing to tell a user
                    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                    self.model = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
        self.model.peft_config[name].base_model_name_or_path = self.base_model_id  # PEFT may overwrite it with None

    def has_adapter(self, name: str) -> bool:
        return self.model is not None and name in self.model.peft_config

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` (e.g. the temporary one a registration measures its budget with)."""
        if self.has_adapter(name):
            if len(self.model.peft_config) == 1:
                self.base = self.model.unload()
                self.model = None
            else:
                self.model.delete_adapter(name)

    def calibrate(self, name: str, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Freeze the masks of adapter ``name`` from its peer's own data; returns the per-layer sparsity."""
        self.activate([name])
        with autocast(self.precision, self.device):
            return calibrate(
                self.model, [self.on_device(b) for b in batches], adapter_name=name, max_steps=len(batches)
            )

    @property
    def device(self) -> torch.device:
        """The device of the base model (a GPU when the peer has one)."""
        return next(self.base.parameters()).device

    @property
    def precision(self) -> str:
        """The compute precision the terms pin (sorlora/runtime/precision.py)."""
        return self.terms.precision

    def on_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` on the device of the base model (a GPU when the peer has one)."""
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ views
    def own_state(self, name: str, round: int):
        """Adapter ``name`` as it travels: a ``SparseUpdate`` (SO-LoRA) or a ``DenseUpdate`` (LoRA)."""
        return self.kind.own_state(self.model, name, round=round, terms=self.terms, base_model=self.base_model_id)

    def load_view(self, view: Mapping[str, object]) -> None:
        """Write a view (adapter name -> payload) into the workspace, adding adapters it lacks.

        An added adapter gets its member's deterministic config (same A); the masks come from the view's payloads.
        """
        for name, state in view.items():
            if not self.has_adapter(name):
                self.add_adapter(name, peer_of(name))
            self.kind.apply(self.model, name, state)

    # ------------------------------------------------------------------ running
    def activate(self, names: Sequence[str], trainable: str | None = None) -> None:
        """Make ``names`` the active adapters (summed in the forward); only ``trainable`` gets gradients."""
        self.model.base_model.set_adapter(sorted(names))
        suffix = None if trainable is None else f".{trainable}"
        for param_name, param in self.model.named_parameters():
            if param.requires_grad and (
                suffix is None or not (param_name.endswith(suffix) or f"{suffix}." in param_name)
            ):
                param.requires_grad_(False)

    @property
    def network(self) -> torch.nn.Module:
        """The transformers model with the adapter layers injected (honours several active adapters)."""
        return self.model.base_model.model

    def train(self, name: str, active: Sequence[str], batches: Iterable[Mapping[str, torch.Tensor]], *, lr: float):
        """A fresh AdamW over adapter ``name`` for the given batches (the other active adapters stay frozen)."""
        self.activate(active, trainable=name)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"adapter {name} has nothing to train")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        network = self.network
        network.train()
        losses = []
        for batch in batches:
            with autocast(self.precision, self.device):
                loss = answer_loss(network, self.on_device(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        network.eval()
        return losses

    def bare_base(self):
        """A context in which the model runs without any adapter (the base model's own forward)."""
        import contextlib

        return contextlib.nullcontext() if self.model is None else self.model.disable_adapter()

    def clean_copy(self) -> torch.nn.Module:
        """A deep copy of the base model without any adapter (for an implicit MoE over it)."""
        import copy

        return copy.deepcopy(self.base) if self.model is None else copy.deepcopy(self.model).unload()

    def release(self) -> torch.nn.Module:
        """Remove every adapter and give the untouched base model back."""
        base = self.model.unload() if self.model is not None else self.base
        self.model = None
        self.base = base
        return base
