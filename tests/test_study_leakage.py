"""What a member's task statistics leak (sorlora/study/leakage.py, moe_router/privacy.py): non-negative matching
pursuit on the layer-0 h0 recovers the content tokens of the private batch from exact statistics, and no more
than from random statistics once the statistics are released with stats_epsilon; the Gaussian mechanism is
calibrated as stated."""

from __future__ import annotations

import math

import pytest
import torch

from moe_router.privacy import DEFAULT_DELTA, gaussian_sigma, private_mean, private_statistics
from sorlora.protocol.program import POSITION_CELL_MM, coarse_position
from sorlora.protocol.terms import CollabTerms, TermsError
from sorlora.study.leakage import nnmp, privacy_measurement


def test_nnmp_recovers_a_non_negative_combination_of_atoms():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(200, 64, generator=g)
    target = 0.5 * atoms[3] + 0.3 * atoms[17] + 0.2 * atoms[150]
    assert set(nnmp(target, atoms, 3)) == {3, 17, 150}


def test_matching_pursuit_recovers_exact_statistics_and_no_more_than_random_from_released_ones():
    exact, released = privacy_measurement(epsilons=(None, 1.0), draws=10)
    print(f"content tokens {exact['content_tokens']}: exact {exact['recovered_shipped_mean']:.1f}, random "
          f"{exact['recovered_random_mean']:.2f} (max {exact['recovered_random_max']}); stats_epsilon=1: "
          f"{released['recovered_shipped_mean']:.2f} (max {released['recovered_shipped_max']})")  # fmt: skip
    assert exact["content_tokens"] >= 5
    assert exact["recovered_shipped_mean"] >= 0.7 * exact["content_tokens"], "the attack works on exact statistics"
    assert exact["recovered_shipped_mean"] > exact["recovered_random_max"]
    assert released["recovered_shipped_mean"] <= released["recovered_random_mean"] + 0.5
    assert released["recovered_shipped_max"] <= released["recovered_random_max"]


def test_the_gaussian_mechanism_is_calibrated_to_one_example():
    rows = torch.ones(50, 4) * 10  # norm 20, clipped to 2
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([private_mean(rows, 1.0, 2.0, generator=g) for _ in range(400)])
    sigma = gaussian_sigma(1.0, DEFAULT_DELTA, 2 * 2.0 / 50)
    assert draws.mean(0).norm() == pytest.approx(2.0, rel=0.05), "rows are clipped to the bound before the mean"
    assert draws.std(0).mean() == pytest.approx(sigma, rel=0.1)
    stats = private_statistics([{"a": torch.ones(3), "b": torch.zeros(2)}] * 10, 2.0, generator=g)
    assert (
        set(stats) == {"a", "b"} and stats["a"].shape == (3,) and all(torch.isfinite(v).all() for v in stats.values())
    )
    with pytest.raises(ValueError):
        private_mean(torch.ones(0, 3), 1.0, 1.0)


def test_terms_carry_stats_epsilon_and_public_and_positions_are_coarse():
    terms = CollabTerms(base_model="tiny-random-llama", base_fingerprint="x")
    assert terms.stats_epsilon is None and terms.public is False
    assert CollabTerms.from_dict({**terms.to_dict(), "stats_epsilon": 1.0}).stats_epsilon == 1.0
    for bad in ({"stats_epsilon": 0}, {"stats_epsilon": math.inf}, {"public": "yes"}):
        with pytest.raises(TermsError):
            terms.replace(**bad)
    assert POSITION_CELL_MM == 10_000
    assert coarse_position((12_345, -4_999)) == (10_000, 0) and coarse_position(None) is None
    assert coarse_position((10**30 + 7, 0))[0] % POSITION_CELL_MM == 0, "any integer goes through, exactly"


TOKENS = {
    "lab": "hf_lab_0123456789abcdef0000",
    "alice": "hf_alice_0123456789abcdef",
    "eve": "hf_eve_0123456789abcdef000",
}


@pytest.mark.parametrize("public", [False, True])
def test_a_collaboration_repo_is_private_unless_the_terms_say_public(tmp_path, public):
    from sorlora.protocol.collab import Collaboration, create_collaboration
    from sorlora_gossip.hub import HfHub, HubServer
    from sorlora_gossip.hub.base import HubAuthError

    terms = CollabTerms(base_model="tiny-random-llama", base_fingerprint="x", admitted=("alice",), public=public)
    with HubServer(tmp_path / "srv", tokens=TOKENS) as srv:

        def hub(user):
            return HfHub(srv.endpoint, token=TOKENS.get(user), namespace=user or "lab", cache_dir=tmp_path / f"c{user}",
                         max_retries=1, backoff=0.01, max_backoff=0.02)  # fmt: skip

        create_collaboration(hub("lab"), "lab/c", terms)
        assert srv.hub.is_private("lab/c") is (not public)  # the server's storage
        assert Collaboration(hub("alice"), "lab/c").terms().public is public, "an admitted member reads it"
        if public:
            assert Collaboration(hub("eve"), "lab/c").terms() == Collaboration(hub(None), "lab/c").terms()
        else:
            with pytest.raises(TermsError, match="no collaboration"):  # not admitted: as on the Hub, not shown
                Collaboration(hub("eve"), "lab/c").terms()
            with pytest.raises(HubAuthError, match="private: reads need a token"):
                Collaboration(hub(None), "lab/c").terms()
