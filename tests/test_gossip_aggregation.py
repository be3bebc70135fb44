"""Aggregation: masked averaging of sparse B, dense LoRA FedAvg, and the inter-cluster exchange of experts."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_sorlora import SOLoRAConfig, SparseUpdate, calibrate, get_sparse_update, projection_matrix
from sorlora_gossip.aggregation import cluster_experts, fedavg, masked_average, masked_average_updates, member_views

from .solora_models import tiny_llama


def _partition(seed: int, members: int, shape: tuple[int, int], empty: float = 0.2) -> list[torch.Tensor]:
    """Disjoint masks: every position goes to one member, or (with probability ``empty``) to nobody."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, members, shape, generator=g)
    owner[torch.rand(shape, generator=g) < empty] = -1
    return [owner == j for j in range(members)]


layer_shapes = st.tuples(st.integers(1, 9), st.integers(1, 6))


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    members=st.integers(1, 6),
    shapes=st.lists(layer_shapes, min_size=1, max_size=3),
    weights=st.lists(st.floats(0.01, 1e4), min_size=6, max_size=6),
    sparse=st.booleans(),
)
def test_disjoint_masks_give_exactly_the_members_parts(seed, members, shapes, weights, sparse):
    g = torch.Generator().manual_seed(seed + 1)
    masks = [{} for _ in range(members)]
    dense = [{} for _ in range(members)]
    for k, shape in enumerate(shapes):
        for j, m in enumerate(_partition(seed + k, members, shape)):
            masks[j][f"l{k}"] = m
            dense[j][f"l{k}"] = torch.randn(shape, generator=g) * 10 ** torch.randint(-3, 4, (), generator=g)
    updates = [{k: (b[masks[j][k]] if sparse else b) for k, b in d.items()} for j, d in enumerate(dense)]
    b_bar = masked_average(updates, masks, weights[:members])
    for k in b_bar:
        expected = sum(torch.where(masks[j][k], dense[j][k], 0.0) for j in range(members))
        assert torch.equal(b_bar[k], expected)  # bit-exact: each held entry is copied with coefficient 1.0
        nobody = ~torch.stack([masks[j][k] for j in range(members)]).any(0)
        assert torch.all(b_bar[k][nobody] == 0)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    members=st.integers(1, 6),
    shape=layer_shapes,
    weights=st.lists(st.floats(0.01, 100.0), min_size=6, max_size=6),
)
def test_full_overlap_is_the_plain_mean(seed, members, shape, weights):
    g = torch.Generator().manual_seed(seed)
    bs = [{"l": torch.randn(shape, generator=g)} for _ in range(members)]
    full = [{"l": torch.ones(shape, dtype=torch.bool)} for _ in range(members)]
    mean = torch.stack([b["l"] for b in bs]).mean(0)
    torch.testing.assert_close(masked_average(bs, full)["l"], mean)
    w = torch.tensor(weights[:members], dtype=torch.float64)
    weighted = (torch.stack([b["l"].double() for b in bs]) * (w / w.sum())[:, None, None]).sum(0)
    torch.testing.assert_close(masked_average(bs, full, weights[:members])["l"], weighted.float())


def test_partial_overlap_averages_each_entry_over_its_holders():
    b1, b2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    m1 = torch.tensor([[True, True], [False, False]])
    m2 = torch.tensor([[False, True], [True, False]])
    out = masked_average([{"l": b1}, {"l": b2}], [{"l": m1}, {"l": m2}], [1.0, 3.0])["l"]
    # (0,0): only member 1; (0,1): both, weights 1:3; (1,0): only member 2; (1,1): nobody.
    torch.testing.assert_close(out, torch.tensor([[1.0, (2.0 + 3 * 20.0) / 4], [30.0, 0.0]]))


def test_masked_average_refuses_bad_input():
    m = {"l": torch.ones(2, 2, dtype=torch.bool)}
    b = {"l": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="positive"):
        masked_average([b], [m], [0.0])
    with pytest.raises(ValueError, match="sparse values"):
        masked_average([{"l": torch.zeros(3)}], [m])
    with pytest.raises(ValueError, match="layers"):
        masked_average([b, {"x": torch.zeros(2, 2)}], [m, {"x": m["l"]}])
    with pytest.raises(ValueError, match="NaN"):
        masked_average([{"l": torch.full((2, 2), float("nan"))}], [m])
    with pytest.raises(ValueError, match="at least one"):
        masked_average([], [])


def test_orthogonal_sparse_averaging_equals_summed_delta_w_but_dense_fedavg_does_not():
    """The design claim (method.md §3), stated exactly.

    Members j = 1..m hold frozen orthogonal projections A_j (A_i A_jᵀ = 0 for i ≠ j, A_j A_jᵀ = I) and disjoint masks
    M_j. The masked average copies each held entry unchanged (coefficient 1), so B̄ ⊙ M_j = B_j ⊙ M_j and

        Σ_j (B̄ ⊙ M_j) A_j = Σ_j (B_j ⊙ M_j) A_j = Σ_j ΔW_j = m · mean_j ΔW_j

    to float precision: the cluster's combined update is the *sum* of the members' updates (m times their average),
    with no cross terms. Orthogonality adds that member k's update is recovered intact on its own subspace:
    (Σ_j ΔW_j) A_kᵀ = ΔW_k A_kᵀ = B_k ⊙ M_k. Dense FedAvg of A and B instead gives
    mean(B) mean(A) = (1/m²) Σ_{i,j} B_i A_j, which has cross terms B_i A_j (i ≠ j) and equals neither the sum
    nor the mean of the members' ΔW_j = B_j A_j.
    """
    m, out_f, r, in_f = 3, 24, 4, 32
    a = [
        projection_matrix(projection="orthogonal", seed=7, slot=j, r=r, in_features=in_f, layer_key="q")
        for j in range(m)
    ]
    for i in range(m):
        for j in range(m):
            expected = torch.eye(r) if i == j else torch.zeros(r, r)
            torch.testing.assert_close(a[i] @ a[j].T, expected, atol=1e-6, rtol=0)
    masks = _partition(3, m, (out_f, r), empty=0.3)
    g = torch.Generator().manual_seed(5)
    b = [torch.randn(out_f, r, generator=g) for _ in range(m)]
    delta = [(b[j] * masks[j]) @ a[j] for j in range(m)]

    b_bar = masked_average([{"q": b[j]} for j in range(m)], [{"q": masks[j]} for j in range(m)], [1.0, 2.0, 5.0])["q"]
    combined = sum((b_bar * masks[j]) @ a[j] for j in range(m))
    torch.testing.assert_close(combined, sum(delta), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(combined, m * torch.stack(delta).mean(0), atol=1e-6, rtol=1e-5)
    for k in range(m):
        torch.testing.assert_close(combined @ a[k].T, b[k] * masks[k], atol=1e-5, rtol=1e-5)

    # Dense LoRA FedAvg of A and B (each member trains all of B and its own A): cross terms appear.
    avg = fedavg([{"A": a[j], "B": b[j]} for j in range(m)])
    dense_product = avg["B"] @ avg["A"]
    dense_delta = [b[j] @ a[j] for j in range(m)]
    for target in (sum(dense_delta), torch.stack(dense_delta).mean(0)):
        assert (dense_product - target).norm() > 0.3 * target.norm()


def test_fedavg_weighted_mean_and_errors():
    sd1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    sd2 = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = fedavg([sd1, sd2], [1.0, 3.0])
    torch.testing.assert_close(out["a"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(out["b"], torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="keys"):
        fedavg([sd1, {"a": sd2["a"]}])
    with pytest.raises(ValueError, match="shape"):
        fedavg([sd1, {"a": torch.zeros(3), "b": sd2["b"]}])


def _peer(slot: int, seed: int) -> torch.nn.Module:
    cfg = SOLoRAConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        init_weights=False,
        task_type="CAUSAL_LM",
        projection="orthogonal",
        projection_seed=11,
        slot=slot,
        sparsity=0.3,
    )
    model = get_peft_model(tiny_llama(), cfg)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    calibrate(model, [{"input_ids": ids, "labels": ids}])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "solora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def peer_updates() -> dict[int, SparseUpdate]:
    return {v: get_sparse_update(_peer(slot=v, seed=100 + v), round=0) for v in range(4)}


def test_cluster_experts_one_expert_per_cluster(peer_updates):
    g = nx.Graph()
    for v, c in [(0, 0), (1, 1), (2, 0), (3, 1)]:
        g.add_node(v, cluster=c)
    weights = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    experts = cluster_experts(g, peer_updates, weights)
    assert sorted(experts) == [0, 1]
    for c, members in [(0, [0, 2]), (1, [1, 3])]:
        expert = experts[c]
        assert [int(u.metadata["slot"]) for u in expert] == members  # sorted by peer, each keeps its own A seed/slot
        b_bar = masked_average(
            [peer_updates[v].values for v in members],
            [peer_updates[v].masks for v in members],
            [weights[v] for v in members],
        )
        for v, view in zip(members, expert):
            assert view.has_structure and view.metadata == peer_updates[v].metadata
            for key, mask in peer_updates[v].masks.items():
                assert torch.equal(view.masks[key], mask)
                assert torch.equal(view.values[key], b_bar[key][mask])
            # The view travels as a real payload and parses back.
            again = SparseUpdate.from_bytes(view.to_bytes(), expected_config_hash=view.config_hash)
            assert all(torch.equal(again.values[k], view.values[k]) for k in view.values)
    # No averaging across clusters: cluster 0's values depend only on peers 0 and 2.
    other = dict(peer_updates)
    other[1] = get_sparse_update(_peer(slot=1, seed=999), round=0)
    again = cluster_experts(g, other, weights)
    assert all(torch.equal(x.values[k], y.values[k]) for x, y in zip(again[0], experts[0]) for k in x.values)
    assert not all(torch.equal(x.values[k], y.values[k]) for x, y in zip(again[1], experts[1]) for k in x.values)


def test_value_only_updates_need_the_stored_structure(peer_updates):
    later = {v: SparseUpdate(values=u.values, metadata=dict(u.metadata, round="2")) for v, u in peer_updates.items()}
    members = [later[0], later[2]]
    with pytest.raises(ValueError, match="round-0"):
        masked_average_updates(members)
    stored = [peer_updates[0], peer_updates[2]]
    b_bar = masked_average_updates(members, structure=stored)
    torch.testing.assert_close(b_bar, masked_average_updates(stored))
    views = member_views(b_bar, members, structure=stored)
    assert [v.round for v in views] == [2, 2] and all(v.has_structure for v in views)
