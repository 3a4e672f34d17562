"""Checking a group's aggregate against what its members claimed (DESIGN notes: docs/design.md).

Each member i publishes w_i and c_i = <Delta_i, R> for a seeded Gaussian R. The projection is
linear, so the weighted mean's projection must be sum_i w_i c_i / sum_i w_i. The result that came
over the wire carries rounding error, and the tolerance is derived from it, not from the size of
the pseudo-gradients (a relative tolerance rejects honest rounds at small learning rates):

- each entry a_j of the result is off by at most e_j = k u (offset + |a_j|), with u = 2^-24 the
  fp32 unit roundoff, offset the constant added on the wire, and k = group size + 2 roundings
  (one per member's fp32 input, the reducer's sum, the final subtraction);
- those roundings are independent, so <error, R> has a spread of at most
  sqrt(sum_j (e_j r_j)^2); the tolerance is `sigmas` of that spread.

What a checksum proves: the aggregate is the weighted mean of the claimed contributions. Not
that any claim is honest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

FP32_UNIT_ROUNDOFF = 2.0**-24


def projection_probe(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """The next Gaussian block of a seeded projection (float64)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def projection_checksum(params: Mapping[str, torch.Tensor], seed: int) -> float:
    """<params, R> in float64 for a seeded Gaussian R; linear, so it commutes with weighted means."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for k in sorted(params):
        total += float((params[k].double() * projection_probe(params[k].shape, gen)).sum())
    return total


def checksum_tolerance(
    averaged: Mapping[str, torch.Tensor],
    seed: int,
    group_size: int,
    offset: float,
    sigmas: float = 10.0,
) -> float:
    """`sigmas` times the spread of <wire rounding error, R> for this result (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    roundings = group_size + 2
    variance = 0.0
    for k in sorted(averaged):
        probe = projection_probe(averaged[k].shape, gen)
        bound = roundings * FP32_UNIT_ROUNDOFF * (offset + averaged[k].double().abs())
        variance += float((bound * probe).pow(2).sum())
    return sigmas * math.sqrt(variance) + 1e-300


def expected_checksum(weights: Sequence[float], checksums: Sequence[float]) -> float:
    """sum_i w_i c_i / sum_i w_i; weights must be >= 0 with a positive sum."""
    total = math.fsum(weights)
    if any(w < 0 for w in weights) or not total > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    return math.fsum(w * c for w, c in zip(weights, checksums, strict=True)) / total


def checksum_problem(
    averaged: Mapping[str, torch.Tensor],
    weights: Sequence[float],
    checksums: Sequence[float],
    seed: int,
    offset: float,
) -> str | None:
    """None when `averaged` is the weighted mean of the claimed contributions, else why not."""
    if not weights or math.fsum(weights) <= 0 or any(w < 0 for w in weights):
        return "non-positive total weight"
    expected = expected_checksum(weights, checksums)
    actual = projection_checksum(averaged, seed)
    tolerance = checksum_tolerance(averaged, seed, len(weights), offset)
    if abs(actual - expected) > tolerance:
        return f"checksum mismatch ({actual:.6g} != {expected:.6g}, tolerance {tolerance:.2g})"
    return None
