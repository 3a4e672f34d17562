"""int8 blockwise codec against a plain-Python reference, its error bound and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from swarmtune.aggregation.codec import BLOCK, from_int8_blocks, int8_blocks, n_blocks


def _reference(values: list[float], block: int) -> tuple[list[int], list[float]]:
    """The codec's definition, value by value (round half to even, as torch.round does)."""
    codes, scales = [], []
    for start in range(0, len(values), block):
        chunk = values[start : start + block]
        scale = max(abs(v) for v in chunk)
        scales.append(scale)
        codes += [0 if scale == 0 else max(-127, min(127, round(127 * v / scale))) for v in chunk]
    return codes, scales


@pytest.mark.parametrize("shape", [(1,), (63,), (64,), (65,), (8, 96), (3, 5, 7)])
def test_codes_and_scales_match_the_reference_and_the_error_bound_holds(shape) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    # blocks of very different magnitudes, as LoRA A and B deltas have
    x = torch.randn(shape, generator=generator) * torch.logspace(-6, 1, math.prod(shape)).reshape(
        shape
    )
    codes, scales = int8_blocks(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (n_blocks(x.numel()),)
    ref_codes, ref_scales = _reference(x.reshape(-1).tolist(), BLOCK)
    assert scales.tolist() == pytest.approx(ref_scales, rel=0, abs=0)
    # the reference divides in float64: a code may differ by one where 127 v / s sits on .5
    diff = (codes.reshape(-1).long() - torch.tensor(ref_codes)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    decoded = from_int8_blocks(codes, scales)
    per_value_scale = scales.repeat_interleave(BLOCK)[: x.numel()].reshape(shape)
    eps = torch.finfo(torch.float32).eps
    bound = per_value_scale / 254 + 4 * eps * per_value_scale
    assert ((decoded - x).abs() <= bound).all()


def test_zero_blocks_and_extremes_decode_exactly() -> None:
    x = torch.zeros(2 * BLOCK)
    x[BLOCK] = -3.5  # the block's absmax: code -127, decoded exactly
    codes, scales = int8_blocks(x)
    assert scales.tolist() == [0.0, 3.5]
    decoded = from_int8_blocks(codes, scales)
    assert torch.equal(decoded, x)


def test_decoding_the_same_bytes_is_bit_identical() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    codes, scales = int8_blocks(x)
    again = from_int8_blocks(codes.clone(), scales.clone())
    assert torch.equal(from_int8_blocks(codes, scales), again)
