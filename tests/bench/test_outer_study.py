"""The outer-optimizer study's factor-average error (bench/outer_study.py), against hand values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from outer_study import factor_error  # noqa: E402

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def test_two_scalar_members_by_hand() -> None:
    # start A0 = B0 = 0; members (a, b) = (1, 2) and (3, 0): the exact mean of b*a is
    # (2 + 0) / 2 = 1, the factor average is mean(b) * mean(a) = 1 * 2 = 2: error |2 - 1| / 1
    start = {A: torch.zeros(1, 1), B: torch.zeros(1, 1)}
    deltas = [  # delta = start - end
        {A: -torch.tensor([[1.0]]), B: -torch.tensor([[2.0]])},
        {A: -torch.tensor([[3.0]]), B: -torch.tensor([[0.0]])},
    ]
    assert factor_error(start, deltas) == pytest.approx(1.0, abs=1e-12)


def test_a_shared_frozen_a_makes_the_factor_average_exact() -> None:
    # FFA-LoRA: every member keeps A = A0, so mean(B_i) A0 = mean(B_i A0) exactly
    gen = torch.Generator().manual_seed(0)
    start = {A: torch.randn(4, 16, generator=gen), B: torch.randn(16, 4, generator=gen)}
    deltas = [{A: torch.zeros(4, 16), B: torch.randn(16, 4, generator=gen)} for _ in range(3)]
    assert factor_error(start, deltas) == pytest.approx(0.0, abs=1e-12)
    moved = [{A: torch.randn(4, 16, generator=gen), B: d[B]} for d in deltas]
    assert factor_error(start, moved) > 1e-3  # and is not once A moves apart
