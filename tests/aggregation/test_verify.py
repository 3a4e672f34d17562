"""Checksum verification: linear in the contributions, a tolerance that holds at any scale."""

import math

import pytest
import torch

from aggregation.params import weighted_mean
from aggregation.verify import (
    checksum_problem,
    checksum_tolerance,
    expected_checksum,
    projection_checksum,
)

SHAPES = {"a": (64, 32), "b": (16, 128)}


def _deltas(n: int, scale: float, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()} for _ in range(n)]


def _wire_mean(deltas: list[dict[str, torch.Tensor]], weights: list[float], offset: float):
    """What an fp32 all-reduce with `offset` added on the wire hands back (independent model:
    every input rounded to fp32 after the offset, a weighted fp32 sum, the offset removed)."""
    total = torch.tensor(sum(weights), dtype=torch.float32)
    out = {}
    for k in SHAPES:
        acc = torch.zeros(SHAPES[k], dtype=torch.float32)
        for delta, w in zip(deltas, weights, strict=True):
            acc += (delta[k] + offset) * torch.tensor(w, dtype=torch.float32)
        out[k] = acc / total - offset
    return out


def test_checksum_commutes_with_weighted_mean_in_float64() -> None:
    deltas = [{k: v.double() for k, v in d.items()} for d in _deltas(3, 1.0, 0)]
    weights = [2.0, 5.0, 1.0]
    claims = [projection_checksum(d, 7) for d in deltas]
    mean = {
        k: sum(w * d[k] for d, w in zip(deltas, weights, strict=True)) / sum(weights)
        for k in SHAPES
    }
    # float64 throughout: error ~ eps64 * sqrt(numel) * |entries|, far below 1e-9
    assert abs(projection_checksum(mean, 7) - expected_checksum(weights, claims)) < 1e-9
    assert abs(claims[0] - claims[1]) > 1.0  # different inputs, different projections


@pytest.mark.parametrize("scale", [1e-7, 1e-5, 1e-3, 1e-1])
def test_honest_wire_rounding_is_never_rejected_at_any_scale(scale: float) -> None:
    # The relative tolerance (1e-3) this replaced rejects 17 of these 20 honest rounds at 1e-5.
    weights = [512.0, 1536.0, 768.0]
    for seed in range(20):
        deltas = _deltas(3, scale, seed)
        claims = [projection_checksum(d, seed) for d in deltas]
        wire = _wire_mean(deltas, weights, offset=1.0)
        assert checksum_problem(wire, weights, claims, seed, offset=1.0) is None


def test_a_partial_all_reduce_is_caught_at_the_default_scale() -> None:
    weights = [1.0, 1.0, 1.0]
    deltas = _deltas(3, 1e-3, 1)
    claims = [projection_checksum(d, 3) for d in deltas]
    full = _wire_mean(deltas, weights, offset=1.0)
    # a reducer lost member 2's share of tensor "a": that part is the mean of the other two
    partial = dict(full)
    partial["a"] = _wire_mean([d for d in deltas[:2]], weights[:2], offset=1.0)["a"]
    assert checksum_problem(full, weights, claims, 3, offset=1.0) is None
    assert "checksum mismatch" in (checksum_problem(partial, weights, claims, 3, 1.0) or "")


def test_a_wrong_weight_claim_is_caught() -> None:
    deltas = _deltas(2, 1e-3, 2)
    claims = [projection_checksum(d, 5) for d in deltas]
    averaged = weighted_mean(deltas, [1.0, 3.0])
    assert checksum_problem(averaged, [1.0, 3.0], claims, 5, offset=0.0) is None
    assert checksum_problem(averaged, [3.0, 1.0], claims, 5, offset=0.0) is not None


def test_tolerance_scales_with_the_wire_offset_not_with_the_deltas() -> None:
    small = _deltas(1, 1e-6, 4)[0]
    tol_offset = checksum_tolerance(small, 0, group_size=3, offset=1.0)
    numel = sum(math.prod(s) for s in SHAPES.values())
    # 10 sigmas of (g + 2) u * 1 * |r| summed in quadrature over numel entries
    reference = 10 * 5 * 2.0**-24 * math.sqrt(numel)
    assert 0.8 * reference < tol_offset < 1.2 * reference
    assert checksum_tolerance(small, 0, group_size=3, offset=0.0) < tol_offset * 1e-4


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-1.0, 2.0], []])
def test_bad_weights_are_a_problem_not_a_crash(weights: list[float]) -> None:
    averaged = {"w": torch.zeros(3)}
    assert checksum_problem(averaged, weights, [0.0] * len(weights), 0, 0.0) is not None
