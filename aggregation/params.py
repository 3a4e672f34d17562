"""Pseudo-gradients, weighted means and state fingerprints over named fp32 tensors.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105), section 2: the pseudo-gradient of peer i is
Delta_i = theta^{t-1} - theta_i^{t,H}; the group aggregate is the weighted mean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

Params = dict[str, torch.Tensor]


def clone_params(params: Mapping[str, torch.Tensor]) -> Params:
    """Detached fp32 copies, in sorted key order."""
    return {k: params[k].detach().to(torch.float32).clone() for k in sorted(params)}


def pseudo_gradient(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor]) -> Params:
    """Delta = theta_start - theta_end, key by key; keys must match exactly."""
    if set(start) != set(end):
        raise KeyError(f"parameter names differ: {sorted(set(start) ^ set(end))[:3]}")
    return {k: (start[k].float() - end[k].float()) for k in sorted(start)}


def weighted_mean(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Params:
    """sum_i w_i Delta_i / sum_i w_i; weights must be non-negative with a positive sum."""
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("need one weight per pseudo-gradient, and at least one")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    means: Params = {}
    for k in sorted(deltas[0]):
        acc = torch.zeros_like(deltas[0][k], dtype=torch.float64)
        for delta, w in zip(deltas, weights, strict=True):
            acc += float(w) * delta[k].double()
        means[k] = (acc / total).float()
    return means


def state_hash(params: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and the raw bytes of each tensor."""
    digest = hashlib.sha256()
    for k in sorted(params):
        t = params[k].detach().contiguous().cpu()
        digest.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
