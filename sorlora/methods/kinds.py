"""Adapter kinds: one object per kind of adapter a method trains (SO-LoRA, LoRI, dense LoRA).

A kind owns everything that differs between them: its PEFT config, how a peer's own state becomes a payload (and
which payload class parses it), whether masks are calibrated from data, what travels after round 0, and the
communication stats of one payload. The peer program, workspace and evaluation call the kind and never branch on
the method's name (as PEFT's ``LoraVariant`` replaced ``if use_dora`` branches); a new baseline is one more object.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from peft_sorlora import SOLoRAConfig, SparseUpdate, apply_sparse_update, get_sparse_update, update_stats
from peft_sorlora.exchange import UpdateStats
from sorlora_gossip.accounting import dense_payload_stats
from sorlora_gossip.dense import DenseUpdate

__all__ = ["ADAPTER_KINDS", "AdapterKind", "DenseLoRAKind", "SOLoRAKind", "dense_fingerprint"]


def dense_fingerprint(state: Mapping[str, torch.Tensor], *, r: int, lora_alpha: float) -> str:
    """What two dense LoRA peers must share: rank, alpha and the adapted tensors' names and shapes."""
    described = {
        "r": r,
        "lora_alpha": float(lora_alpha),
        "tensors": sorted([k, list(v.shape)] for k, v in state.items()),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


class AdapterKind:
    """The interface of an adapter kind (see the module docstring)."""

    name: str
    payload_cls: type
    calibrates: bool  # masks are chosen from the peer's data before round 0
    sparse: bool  # payloads are masked B values (aggregation by masked averaging)
    shared_projection: bool = False  # every member's A is the same matrix (LoRI): B entries mean the same for all

    def peft_config(self, terms: Any, *, slot: int, base_model: str) -> Any:
        """The PEFT config of the adapter of the member with index ``slot``."""
        raise NotImplementedError

    def own_state(self, model: Any, adapter_name: str, *, round: int, terms: Any, base_model: str) -> Any:
        """The adapter ``adapter_name`` of ``model`` as it travels in ``round`` (with structure in round 0)."""
        raise NotImplementedError

    def apply(self, model: Any, adapter_name: str, state: Any) -> None:
        """Write a payload's values (and structure) into the existing adapter ``adapter_name``."""
        raise NotImplementedError

    def stats(self, update: Any) -> UpdateStats:
        """Parameters updated and transmitted, and bytes, of one payload."""
        raise NotImplementedError

    def values_only(self, update: Any) -> Any:
        """What round r > 0 sends of ``update`` (SO-LoRA: the values; masks were sent in round 0)."""
        return update

    def with_structure(self, update: Any, structure: Any) -> Any:
        """``update`` completed with the structure of the same peer's round-0 payload."""
        return update

    def init_slot(self, index: int) -> int:
        """Whose random initialisation member ``index`` draws (default: its own)."""
        return index


@dataclass(frozen=True)
class SOLoRAKind(AdapterKind):
    """SO-LoRA (frozen orthogonal A per slot, sparse B) and LoRI (one shared gaussian A, uniform sparse B)."""

    name: str = "solora"
    projection: str = "orthogonal"
    shared_projection: bool = False  # every peer uses slot 0 of one seed (LoRI's common random A)
    allocation: str | None = None  # None: the terms' sparsity_allocation
    payload_cls: type = SparseUpdate
    calibrates: bool = True
    sparse: bool = True

    def peft_config(self, terms: Any, *, slot: int, base_model: str) -> SOLoRAConfig:
        return SOLoRAConfig(
            r=terms.rank,
            lora_alpha=terms.lora_alpha,
            target_modules=list(terms.target_modules),
            projection=self.projection,
            projection_seed=terms.seed,
            slot=0 if self.shared_projection else slot,
            sparsity=terms.sparsity,
            sparsity_allocation=self.allocation or terms.sparsity_allocation,
            payload_dtype=terms.payload_dtype,
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        )

    def own_state(self, model: Any, adapter_name: str, *, round: int, terms: Any, base_model: str) -> SparseUpdate:
        return get_sparse_update(model, adapter_name, round=round)

    def apply(self, model: Any, adapter_name: str, state: SparseUpdate) -> None:
        apply_sparse_update(model, state, adapter_name)

    def stats(self, update: SparseUpdate) -> UpdateStats:
        return update_stats(update)

    def values_only(self, update: SparseUpdate) -> SparseUpdate:
        if update.round == 0:
            return update
        return SparseUpdate(values=update.values, metadata=update.metadata)

    def with_structure(self, update: SparseUpdate, structure: SparseUpdate) -> SparseUpdate:
        if update.has_structure:
            return update
        return SparseUpdate(
            values=update.values, masks=structure.masks, shapes=structure.shapes, metadata=update.metadata
        )


@dataclass(frozen=True)
class DenseLoRAKind(AdapterKind):
    """The DFL-LoRA baseline: dense PEFT LoRA, A and B trained and sent every round (FedAvg)."""

    name: str = "lora"
    payload_cls: type = DenseUpdate
    calibrates: bool = False
    sparse: bool = False
    shared_init: bool = False  # every peer starts from the same random A (FedAvg then averages aligned factors)

    def init_slot(self, index: int) -> int:
        return 0 if self.shared_init else index

    def peft_config(self, terms: Any, *, slot: int, base_model: str) -> LoraConfig:
        return LoraConfig(
            r=terms.rank,
            lora_alpha=terms.lora_alpha,
            target_modules=list(terms.target_modules),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        )

    def own_state(self, model: Any, adapter_name: str, *, round: int, terms: Any, base_model: str) -> DenseUpdate:
        state = {
            k: v.detach().clone()
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False).items()
        }
        metadata = {
            "base_model": base_model,
            "config_hash": dense_fingerprint(state, r=terms.rank, lora_alpha=terms.lora_alpha),
            "round": str(round),
        }
        return DenseUpdate(values=state, metadata=metadata)

    def apply(self, model: Any, adapter_name: str, state: DenseUpdate) -> None:
        set_peft_model_state_dict(model, state.values, adapter_name=adapter_name)

    def stats(self, update: DenseUpdate) -> UpdateStats:
        return dense_payload_stats(update.values)


ADAPTER_KINDS: dict[str, AdapterKind] = {
    "solora": SOLoRAKind(),
    "lori": SOLoRAKind(name="lori", projection="gaussian", shared_projection=True, allocation="uniform"),
    "lora": DenseLoRAKind(),
    "lora-shared-a": DenseLoRAKind(name="lora-shared-a", shared_init=True),
}
