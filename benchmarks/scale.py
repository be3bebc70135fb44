"""Scale in one process: N peers (10, 50, 100) sharing one frozen base model, one SO-LoRA adapter each.

Memory: RSS growth per added peer (its adapter: A, B, mask, plus its :class:`sorlora_gossip.Peer`) against the anchor of a
full copy of the base model (what one process per peer would pay). Time: one gossip round over a
:class:`sorlora_gossip.LocalHub` (every peer serialises its update and pushes it, then pulls its two ring neighbours and
writes their values into their adapters in the shared model), per peer, against the same figure at the smallest N
(a ratio of 1 = linear scaling). Projection ``gaussian`` (the paper's mode): orthogonal mode holds only
``in_features // r`` slots per layer (72 on SmolLM2 at r = 8), fewer than 100 peers.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model

import peft_sorlora
from peft_sorlora.calibration import solora_layers
from sorlora_gossip import LocalHub, Peer

from .common import (
    constant,
    measure,
    release_free_memory,
    rows_against,
    rss_bytes,
    seed_everything,
    smollm2,
    tiny_llama,
)

__all__ = ["run", "ENTRY"]

ENTRY = "scale"
RANK, ALPHA, TARGETS, SPARSITY = 8, 16, ["q_proj", "v_proj"], 0.5


def _config(peer: int) -> peft_sorlora.SOLoRAConfig:
    return peft_sorlora.SOLoRAConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, sparsity=SPARSITY, projection="gaussian", slot=peer,
        base_model_name_or_path="benchmark-base",
    )  # fmt: skip


def _freeze_random_masks(model: torch.nn.Module, name: str, seed: int) -> None:
    """Fix a random mask at the target sparsity (calibration data changes which entries, not the costs)."""
    generator = torch.Generator().manual_seed(seed)
    sparsity = {}
    for layer in solora_layers(model, name):
        shape = (layer.out_features, layer.r[name])
        keep = int(round(SPARSITY * shape[0] * shape[1]))
        flat = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=generator)[:keep]] = True
        layer.set_mask(name, flat.view(shape))
        with torch.no_grad():
            layer.solora_B[name].copy_(torch.randn(shape, generator=generator) * 0.01 * layer.solora_mask[name])
        sparsity[layer.layer_key] = keep / flat.numel()
    model.peft_config[name].layer_sparsity = sparsity


class _Population:
    """One shared base model holding N peers' adapters, each peer with its own Peer client on one LocalHub."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.model = get_peft_model(base, _config(0), adapter_name="peer0000")
        self.model.peft_config["peer0000"].base_model_name_or_path = "benchmark-base"  # PEFT overwrites it
        _freeze_random_masks(self.model, "peer0000", 0)
        self.names = ["peer0000"]
        self.peers: dict[str, Peer] = {}
        self.round = 0

    def grow(self, n: int) -> None:
        """Add adapters until ``n`` peers share the model."""
        while len(self.names) < n:
            i = len(self.names)
            name = f"peer{i:04d}"
            self.model.add_adapter(name, _config(i))
            self.model.peft_config[name].base_model_name_or_path = "benchmark-base"
            _freeze_random_masks(self.model, name, i)
            self.names.append(name)

    def connect(self, hub_root: Path) -> None:
        """Give every peer a fresh client on a fresh hub folder; the next round is round 0."""
        self.peers = {name: Peer(LocalHub(hub_root, namespace="bench"), name) for name in self.names}
        self.round = 0

    def gossip_round(self, n: int) -> None:
        """Peers 0..n-1 push round ``self.round``, pull their ring neighbours and write them into the model."""
        names, r = self.names[:n], self.round
        for name in names:
            self.peers[name].push_round(r, peft_sorlora.get_sparse_update(self.model, name, round=r))
        for i, name in enumerate(names):
            ring = [names[(i - 1) % n], names[(i + 1) % n]]
            pulled = self.peers[name].pull_round(r, ring, timeout=60.0)
            if not pulled.complete:
                raise RuntimeError(f"round {r}: {name} missed {pulled.skipped or pulled.rejected}")
            for other, update in pulled.updates.items():
                peft_sorlora.apply_sparse_update(self.model, update, other)
        self.round += 1


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def run(repeats: int = 5, quick: bool = False, counts: tuple[int, ...] | None = None) -> list[dict]:
    """Rows of memory per extra peer and round time per peer for N in ``counts`` (default 10, 50, 100 on
    SmolLM2-135M; quick: 3, 6 on the tiny Llama). One population grows through the counts; at each N every peer
    gets a fresh client on a fresh hub folder and round 0 (with masks) is the warm-up."""
    seed_everything()
    counts = counts or ((3, 6) if quick else (10, 50, 100))
    label, make_base = ("tiny-llama", tiny_llama) if quick else ("smollm2-135m", lambda: smollm2()[0])
    base = make_base()
    anchor_bytes = _model_bytes(base)
    memory: dict[str, object] = {}
    per_peer_time: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        release_free_memory()  # earlier entries' freed heap would otherwise absorb the adapters unseen
        before = rss_bytes()
        population = _Population(base)
        for n in counts:
            population.grow(n)
            population.connect(Path(tmp) / f"hub-{n}")
            release_free_memory()
            memory[f"{n}_peers"] = constant((rss_bytes() - before) / n)
            step: Callable[[], None] = lambda n=n: population.gossip_round(n)  # noqa: E731
            per_peer_time[f"{n}_peers"] = measure(step, repeats=repeats, warmup=1).scaled(1.0 / n)
    adapter_bytes = sum(
        t.numel() * t.element_size()
        for layer in solora_layers(population.model, "peer0000")
        for t in (layer.solora_A["peer0000"], layer.solora_B["peer0000"], layer.solora_mask["peer0000"])
    )
    memory_figures = {"model_copy": constant(anchor_bytes), "adapter_tensors_exact": constant(adapter_bytes), **memory}
    params = {
        "model": label,
        "rank": RANK,
        "target_modules": TARGETS,
        "sparsity": SPARSITY,
        "projection": "gaussian",
        "peer_counts": list(counts),
        "topology": "ring (2 neighbours)",
        "hub": "LocalHub",
    }
    rows = rows_against(
        ENTRY, memory_figures, anchor="model_copy", unit="bytes/peer", anchor_label="a copy of the base model",
        notes={"adapter_tensors_exact": "A + B + mask of one peer's adapter (the RSS rows add the Peer client, "
               "PEFT bookkeeping and allocator slack)"},
        params=params, group=f"{ENTRY}/{label}/memory",
    )  # fmt: skip
    first = f"{counts[0]}_peers"
    time_note = {
        k: "within noise of linear scaling: peft_sorlora's solora_layers() stops at SO-LoRA layers, so finding an "
        "adapter's layers no longer grows with the number of adapters in the model"
        for k in per_peer_time
        if k != first
    }
    rows += rows_against(
        ENTRY, per_peer_time, anchor=first, unit="s/round/peer", anchor_label=f"{counts[0]} peers (linear scaling)",
        worse_notes=time_note, params=params, group=f"{ENTRY}/{label}/round_time",
    )  # fmt: skip
    for row in rows:
        row["name"] = f"{label} {row['name']}"
    return rows
