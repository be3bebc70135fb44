"""Communication accounting: real payload bytes, SO-LoRA vs dense LoRA ratio, delay and energy from the channel."""

from __future__ import annotations

import json
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save as save_safetensors
from transformers import LlamaConfig, LlamaForCausalLM

from peft_sorlora import SOLoRAConfig, calibrate, get_sparse_update, update_stats
from sorlora_gossip.accounting import (
    CommStats,
    dense_payload_stats,
    lora_round_stats,
    round_stats,
    solora_round_stats,
    total_stats,
)
from sorlora_gossip.topology import cluster_topology, clusters, ring
from sorlora_gossip.wireless import ChannelParams, channel_gains, link_delay, min_power, place_peers

RANK, KEPT = 8, 0.25


def smollm2_shaped_llama() -> LlamaForCausalLM:
    """A random Llama with SmolLM2-135M's per-layer shapes (hidden 576, 9 heads / 3 KV heads of 64, MLP 1536).

    Two layers instead of 30 and a 256-token vocabulary: the adapter payload per layer is the real one, and the
    byte ratio per layer does not depend on the number of layers (only the small header does).
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def payloads():
    """SO-LoRA round-0/round-1 updates and the dense LoRA state dict at the same rank on the same layers."""
    targets = ["q_proj", "v_proj"]
    solora = get_peft_model(
        smollm2_shaped_llama(),
        SOLoRAConfig(r=RANK, target_modules=targets, sparsity=KEPT, init_weights=False, task_type="CAUSAL_LM"),
    )
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    calibrate(solora, [{"input_ids": ids, "labels": ids}])
    lora = get_peft_model(smollm2_shaped_llama(), LoraConfig(r=RANK, target_modules=targets, task_type="CAUSAL_LM"))
    return {
        "round0": get_sparse_update(solora, round=0),
        "round1": get_sparse_update(solora, round=1),
        "lora": get_peft_model_state_dict(lora),
    }


def test_bytes_ratio_is_the_kept_fraction_plus_headers(payloads):
    """SO-LoRA value bytes / dense LoRA value bytes = nnz / (|A| + |B|) = KEPT * |B| / (|A| + |B|), exactly.

    Dense LoRA sends A (r x in) and B (out x r) of every layer; SO-LoRA after round 0 sends only the kept entries of
    B. Both payloads are safetensors: the documented extra bytes are the 8-byte length prefix plus the JSON header
    (tensor names, dtypes, offsets, metadata), counted in ``overhead_bytes``.
    """
    update, lora_sd = payloads["round1"], payloads["lora"]
    sol, dense = update_stats(update), dense_payload_stats(lora_sd)
    a_params = sum(v.numel() for k, v in lora_sd.items() if "lora_A" in k)
    b_params = sum(v.numel() for k, v in lora_sd.items() if "lora_B" in k)
    # Real SmolLM2 layout: q_proj 576->576, v_proj 576->192, rank 8, two layers.
    assert a_params == 2 * (RANK * 576 + RANK * 576) and b_params == 2 * (576 * RANK + 192 * RANK)
    assert dense.params_transmitted == a_params + b_params
    assert Fraction(sol.params_transmitted, b_params) == Fraction(KEPT).limit_denominator(100)
    assert sol.bytes == len(update.to_bytes()) and dense.bytes > dense.value_bytes
    ratio = Fraction(sol.bytes - sol.overhead_bytes, dense.bytes - dense.overhead_bytes)
    assert ratio == Fraction(sol.params_transmitted, a_params + b_params)
    assert ratio == Fraction(KEPT).limit_denominator(100) * Fraction(b_params, a_params + b_params)
    dense_bytes = save_safetensors({k: v.contiguous() for k, v in lora_sd.items()})
    for stats, payload in ((sol, update.to_bytes()), (dense, dense_bytes)):
        (header_len,) = struct.unpack("<Q", payload[:8])
        assert stats.bytes == len(payload) and stats.overhead_bytes == 8 + header_len
        assert stats.overhead_bytes < 0.1 * stats.bytes  # the header is per tensor, small next to the values
    assert sol.bytes / dense.bytes == pytest.approx(float(ratio), rel=0.1)


def test_round_stats_counts_real_bytes_per_link(payloads):
    g = ring(5, positions=place_peers(5, seed=0))
    sol = solora_round_stats(g, {v: payloads["round1"] for v in g})
    lora = lora_round_stats(g, {v: payloads["lora"] for v in g})
    per_payload = len(payloads["round1"].to_bytes())
    assert sol.num_links == lora.num_links == 2 * g.number_of_edges()
    assert all(link.bytes == per_payload for link in sol.links.values())
    assert sol.bytes_sent == per_payload * sol.num_links
    assert sol.params_sent == payloads["round1"].num_values * sol.num_links
    assert sol.bytes_sent / lora.bytes_sent == pytest.approx(
        update_stats(payloads["round1"]).bytes / dense_payload_stats(payloads["lora"]).bytes
    )
    # Updated parameters: SO-LoRA trains only the masked B entries, dense LoRA trains A and B.
    assert sol.params_updated == 5 * payloads["round1"].num_values
    assert lora.params_updated == 5 * sum(v.numel() for v in payloads["lora"].values())
    # Round 0 also carries the masks: more bytes, same values.
    first = solora_round_stats(g, {v: payloads["round0"] for v in g})
    assert first.bytes_sent > sol.bytes_sent and first.params_sent == sol.params_sent
    assert first.overhead_bytes - sol.overhead_bytes == first.bytes_sent - sol.bytes_sent


def test_delay_and_energy_from_the_channel(payloads):
    channel = ChannelParams(p_max_w=0.2, delay_bound_s=2.0)
    pos = place_peers(6, seed=3)
    gains = channel_gains(pos, seed=3, params=channel)
    g = ring(6, positions=pos)
    sol_q = 8.0 * update_stats(payloads["round1"]).bytes
    lora_q = 8.0 * dense_payload_stats(payloads["lora"]).bytes
    sol = solora_round_stats(g, {v: payloads["round1"] for v in g}, gains=gains, channel=channel)
    lora = lora_round_stats(g, {v: payloads["lora"] for v in g}, gains=gains, channel=channel)
    # Lemma 1 power: every link takes exactly Gamma; energy = sum of p* Gamma.
    assert sol.delay_s == lora.delay_s == channel.delay_bound_s
    expected = sum(min_power(sol_q, gains[i, j], num_links=2, params=channel) * 2.0 for i, j in sol.links)
    assert sol.energy_j == pytest.approx(expected)
    assert sol.energy_j < lora.energy_j  # fewer bits need less power for the same delay
    # Full power: p_max split over the links; delay = Q / rate, energy = p t.
    sol_f = solora_round_stats(
        g, {v: payloads["round1"] for v in g}, gains=gains, channel=channel, power_policy="full_power"
    )
    lora_f = lora_round_stats(
        g, {v: payloads["lora"] for v in g}, gains=gains, channel=channel, power_policy="full_power"
    )
    slowest = max(link_delay(lora_q, 0.1, gains[i, j], num_links=2, params=channel) for i, j in lora_f.links)
    assert lora_f.delay_s == pytest.approx(slowest)
    assert sol_f.delay_s < lora_f.delay_s
    link = sol_f.links[(0, 1)]
    assert link.energy_j == pytest.approx(0.1 * link.delay_s)
    # A p_max too small for the payload makes the round infeasible.
    tight = ChannelParams(p_max_w=1e-12, delay_bound_s=0.01)
    assert not lora_round_stats(g, {v: payloads["lora"] for v in g}, gains=gains, channel=tight).feasible


def test_cluster_topology_gains_are_reused_and_totals_add_up(payloads):
    payload_bits = 8.0 * update_stats(payloads["round1"]).bytes
    pos = place_peers(8, seed=1)
    g = cluster_topology(pos, np.full(8, KEPT / 4), s_max=0.05, payload_bits=payload_bits, seed=1)
    assert any(len(c) > 1 for c in clusters(g))
    rounds = [solora_round_stats(g, {v: payloads["round1"] for v in g}) for _ in range(3)]
    assert all(r.feasible for r in rounds)  # the clustering only formed power-feasible clusters
    total = total_stats(rounds)
    assert total.rounds == 3 and total.bytes_sent == 3 * rounds[0].bytes_sent
    assert total.bytes_per_round == rounds[0].bytes_sent and total.energy_j == pytest.approx(3 * rounds[0].energy_j)
    assert all(total.links[k].bytes == 3 * rounds[0].links[k].bytes for k in total.links)
    summary = json.loads(json.dumps(total.as_dict()))
    assert summary["rounds"] == 3 and summary["num_links"] == rounds[0].num_links
    with pytest.raises(ValueError, match="lora"):
        total + lora_round_stats(g, {v: payloads["lora"] for v in g})
    with pytest.raises(ValueError, match="at least one"):
        total_stats([])


def test_bad_input():
    g = ring(3)
    with pytest.raises(ValueError, match="no payload"):
        round_stats(g, {}, method="x")
    stats = dense_payload_stats({"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="pos"):
        round_stats(g, {v: stats for v in g}, method="x")
    with pytest.raises(ValueError, match="power_policy"):
        round_stats(g, {v: stats for v in g}, method="x", power_policy="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        dense_payload_stats({})
    assert isinstance(round_stats(ring(1), {0: stats}, method="x"), CommStats)
