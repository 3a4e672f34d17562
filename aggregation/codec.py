"""Blockwise absmax int8 quantization of contributions (docs/design.md, 4. The exchange).

A tensor is flattened and cut into blocks of `block` values (the last one may be shorter).
Block b is sent as int8 codes q = round(127 x / s_b) with s_b = max |x| over the block, and read
back as q * (s_b / 127). Rounding to nearest bounds the error of every value by s_b / 254, up to
fp32 rounding. This is the linear ("absmax") variant of blockwise quantization as in Dettmers et
al. 2022 (arXiv 2110.02861), without their non-linear code book: the decode is one
multiplication per value, so every member that decodes the same bytes gets bit-identical fp32.
"""

from __future__ import annotations

import torch

BLOCK = 64  # values per scale: 4 bytes of scale per 64 bytes of codes (0.27 x fp32 in all)
QMAX = 127


def int8_blocks(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like x, fp32 absmax scales of the ceil(numel / block) blocks)."""
    flat = x.detach().to(torch.float32).reshape(-1)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % block)).reshape(-1, block)
    scales = padded.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(padded * (QMAX / safe)[:, None]).clamp_(-QMAX, QMAX)
    return codes.reshape(-1)[:n].to(torch.int8).reshape(x.shape), scales


def from_int8_blocks(codes: torch.Tensor, scales: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """fp32 values q * (s_b / 127) of int8 codes and their block scales (shape of codes)."""
    flat = codes.reshape(-1).to(torch.float32)
    n = flat.numel()
    step = (scales.to(torch.float32) / QMAX).repeat_interleave(block)[:n]
    return (flat * step).reshape(codes.shape)


def n_blocks(numel: int, block: int = BLOCK) -> int:
    """How many scales a tensor of `numel` values has."""
    return -(-numel // block)
