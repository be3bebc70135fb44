"""Sparse and dense payloads implement one Payload protocol: structure, exact size bounds, fingerprint and stats."""

from __future__ import annotations

import hashlib

import torch

from peft_sorlora import SparseUpdate
from peft_sorlora.exchange import header_bound
from sorlora_gossip import DenseUpdate, Payload

from .gossip_payloads import calibrated_mlp, update_for_round


def test_sparse_and_dense_updates_are_payloads_with_real_bounds():
    model = calibrated_mlp()
    first, later = update_for_round(model, 0, seed=0), update_for_round(model, 1, seed=0)
    dense = DenseUpdate(values={"m.lin0.lora_A.weight": torch.randn(4, 32), "m.lin0.lora_B.weight": torch.randn(32, 4)},
                        metadata={"round": "0", "base_model": "toy/mlp-32", "config_hash": "h"})  # fmt: skip
    for payload in (first, later, dense):
        assert isinstance(payload, Payload)
        assert payload.fingerprint() == hashlib.sha256(payload.to_bytes()).hexdigest()
        assert payload.stats().bytes == len(payload.to_bytes())
    # a values-only payload is sized exactly by its masks, up to the header bound
    values = sum(v.numel() * v.element_size() for v in later.values.values())
    bound = first.max_bytes(structure=False)
    assert values < len(later.to_bytes()) <= bound == values + header_bound(len(first.masks))
    assert len(first.to_bytes()) <= first.max_bytes(structure=True)
    assert len(dense.to_bytes()) <= dense.max_bytes(structure=True)
    again = SparseUpdate.from_bytes(later.to_bytes(), masks=first.structure)
    assert again.fingerprint() == later.fingerprint()
    assert DenseUpdate.from_bytes(dense.to_bytes(), masks=dense.structure).structure == dense.structure
