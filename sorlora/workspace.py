"""A workspace: one frozen base model in memory holding every peer's adapter of one method; peers take turns.

A peer's state is its *view*: the adapter values it holds (its own, plus its cluster members' for SO-LoRA cluster
methods). Before a peer trains or is evaluated its view is loaded into the workspace, so many peers share one base
model (integration.md: 10+ peers fit in memory) and a Ray actor can run the same code with a workspace of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_sorlora import SOLoRAConfig, apply_sparse_update, calibrate, get_sparse_update
from peft_sorlora.projection import derive_seed
from sorlora_gossip.dense import DenseUpdate

from .config import ExperimentConfig
from .methods import MethodSpec

__all__ = ["Workspace", "adapter_name", "peer_of", "dense_fingerprint"]

View = dict[str, object]  # adapter name -> SparseUpdate (SO-LoRA) or DenseUpdate (LoRA)


def adapter_name(peer: int) -> str:
    """The adapter (and hub repo) name of a peer."""
    return f"peer{peer:02d}"


def peer_of(name: str) -> int:
    """The peer index of an adapter name made by :func:`adapter_name`."""
    if not name.startswith("peer") or not name[4:].isdigit():
        raise ValueError(f"not a peer adapter name: {name!r}")
    return int(name[4:])


def dense_fingerprint(state: Mapping[str, torch.Tensor], *, r: int, lora_alpha: float) -> str:
    """What two dense LoRA peers must share: rank, alpha and the adapted tensors' names and shapes."""
    described = {
        "r": r,
        "lora_alpha": float(lora_alpha),
        "tensors": sorted([k, list(v.shape)] for k, v in state.items()),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


class Workspace:
    """The base model with one adapter per peer for one method (see module docstring)."""

    def __init__(self, base_model: torch.nn.Module, base_model_id: str, cfg: ExperimentConfig, spec: MethodSpec):
        self.base = base_model
        self.base_model_id = base_model_id
        self.cfg = cfg
        self.spec = spec
        self.model: PeftModel | None = None
        self.peers: list[int] = []

    # ------------------------------------------------------------------ set-up
    def adapter_config(self, peer: int):
        """The adapter config of ``peer`` for this method."""
        cfg, spec = self.cfg, self.spec
        if spec.adapter == "lora":
            return LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.lora_alpha,
                target_modules=list(cfg.target_modules),
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
                base_model_name_or_path=self.base_model_id,
            )
        allocation = cfg.sparsity_allocation if spec.allocation == "config" else spec.allocation
        return SOLoRAConfig(
            r=cfg.rank,
            lora_alpha=cfg.lora_alpha,
            target_modules=list(cfg.target_modules),
            projection=spec.projection,
            projection_seed=cfg.seed,
            slot=0 if spec.shared_projection else peer,
            sparsity=cfg.sparsity,
            sparsity_allocation=allocation,
            payload_dtype=cfg.payload_dtype,
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.base_model_id,
        )

    def add_peer(self, peer: int) -> None:
        """Create ``peer``'s adapter (LoRA's random A is drawn from a per-peer seed, so runs are reproducible)."""
        name, config = adapter_name(peer), self.adapter_config(peer)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.cfg.seed, "adapter", peer) % 2**31)
            if self.model is None:
                self.model = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
        self.model.peft_config[name].base_model_name_or_path = self.base_model_id  # PEFT may overwrite it with None
        self.peers.append(peer)

    def calibrate(self, peer: int, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Freeze ``peer``'s masks from its own data (SO-LoRA methods); returns the per-layer sparsity."""
        name = adapter_name(peer)
        self.activate([name])
        return calibrate(self.model, [self.on_device(b) for b in batches], adapter_name=name, max_steps=len(batches))

    def on_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` on the device of the base model (a GPU when the peer has one)."""
        device = next(self.base.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    # ------------------------------------------------------------------ views
    def own_state(self, peer: int, round: int):
        """``peer``'s own adapter as it travels: a ``SparseUpdate`` (SO-LoRA) or a dense state dict (LoRA)."""
        name = adapter_name(peer)
        if self.spec.adapter == "lora":
            state = {
                k: v.detach().clone()
                for k, v in get_peft_model_state_dict(
                    self.model, adapter_name=name, save_embedding_layers=False
                ).items()
            }
            metadata = {
                "base_model": self.base_model_id,
                "config_hash": dense_fingerprint(state, r=self.cfg.rank, lora_alpha=self.cfg.lora_alpha),
                "round": str(round),
            }
            return DenseUpdate(values=state, metadata=metadata)
        return get_sparse_update(self.model, name, round=round)

    def load_view(self, view: Mapping[str, object]) -> None:
        """Write a peer's view (adapter name -> values) into the workspace, adding adapters it lacks.

        An added adapter gets its peer's deterministic config (same A); the masks come from the view's payloads.
        """
        for name, state in view.items():
            if self.model is None or name not in self.model.peft_config:
                self.add_peer(peer_of(name))
            if self.spec.adapter == "lora":
                set_peft_model_state_dict(self.model, state.values, adapter_name=name)
            else:
                apply_sparse_update(self.model, state, name)

    # ------------------------------------------------------------------ running
    def activate(self, names: Sequence[str], trainable: str | None = None) -> None:
        """Make ``names`` the active adapters (summed in the forward); only ``trainable`` gets gradients."""
        self.model.base_model.set_adapter(list(names))
        for param_name, param in self.model.named_parameters():
            if param.requires_grad and (trainable is None or f".{trainable}" not in param_name):
                param.requires_grad_(False)

    @property
    def network(self) -> torch.nn.Module:
        """The transformers model with the adapter layers injected (honours several active adapters)."""
        return self.model.base_model.model

    def train(
        self, peer: int, active: Sequence[str], batches: Iterable[Mapping[str, torch.Tensor]], *, lr: float
    ) -> list[float]:
        """A fresh AdamW over ``peer``'s own adapter for the given batches (the other active adapters stay frozen)."""
        own = adapter_name(peer)
        self.activate(active, trainable=own)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"peer {peer} has nothing to train")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        network = self.network
        network.train()
        losses = []
        for batch in batches:
            loss = network(**self.on_device(batch)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        network.eval()
        return losses

    def release(self) -> torch.nn.Module:
        """Remove every adapter and give the untouched base model back."""
        base = self.model.unload() if self.model is not None else self.base
        self.model = None
        return base
