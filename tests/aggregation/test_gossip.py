"""Pairwise gossip converges to the group's weighted mean on a toy problem."""

import random

import pytest
import torch

from aggregation.gossip import gossip_round, pair_average, random_pairs
from aggregation.params import weighted_mean


def _toy(n: int, seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    states = {f"p{i}": {"w": torch.randn(5, 3, generator=gen) * (i + 1)} for i in range(n)}
    weights = {f"p{i}": float(100 + 37 * i) for i in range(n)}
    return states, weights


@pytest.mark.parametrize("n", [2, 7, 16])
def test_gossip_converges_to_the_weighted_group_mean(n: int) -> None:
    states, weights = _toy(n)
    target = weighted_mean(
        [states[p] for p in sorted(states)], [weights[p] for p in sorted(states)]
    )
    rng = random.Random(1)
    spread = []
    for _ in range(60):
        states, weights = gossip_round(states, weights, rng)
        total = sum(weights.values())
        kept = weighted_mean(
            [states[p] for p in sorted(states)], [weights[p] for p in sorted(states)]
        )
        torch.testing.assert_close(kept["w"], target["w"], rtol=1e-4, atol=1e-4)  # invariant
        assert total == pytest.approx(sum(100 + 37 * i for i in range(n)))
        spread.append(max(float((s["w"] - target["w"]).abs().max()) for s in states.values()))
    assert spread[-1] < 1e-3 and spread[-1] <= spread[0]


def test_pair_average_and_matching() -> None:
    mean, weight = pair_average({"w": torch.tensor([0.0])}, 1.0, {"w": torch.tensor([3.0])}, 2.0)
    assert float(mean["w"]) == pytest.approx(2.0) and weight == 1.5
    pairs = random_pairs(["a", "b", "c", "d", "e"], random.Random(0))
    assert len(pairs) == 2 and len({p for pair in pairs for p in pair}) == 4
    with pytest.raises(ValueError):
        pair_average({"w": torch.zeros(1)}, 0.0, {"w": torch.zeros(1)}, 0.0)
