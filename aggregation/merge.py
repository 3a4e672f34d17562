"""Merging LoRA task vectors across adapters (docs/design.md, 6. Clusters): a registry of pure functions.

Factors are never averaged directly: mean(B) @ mean(A) != mean(B @ A). Every method works on
each module's task vector dW_i = s_i B_i A_i, with weights w_i:
- cat: sum_i w_i dW_i, exactly, as factors [B_1 .. B_n] @ [w_1 s_1 A_1; ..; w_n s_n A_n]
  (rank sum r_i). linear (weights normalised to sum 1) and task arithmetic (Ilharco et al.
  2023, arXiv 2212.04089: lambda * sum_i w_i dW_i) are exact through cat.
- ties (Yadav et al. 2023, arXiv 2306.01708): keep each w_i dW_i's top `density` entries by
  magnitude, elect the sign of the sum, average the entries that agree with it (disjoint mean).
- dare (Yu et al. 2023, arXiv 2311.03099): drop each entry with probability p (seeded),
  rescale by 1/(1-p); then linear (dare_linear) or TIES without the trim (dare_ties).
Dense results are re-factorised by truncated SVD (`refactor`), which reports the energy kept.
All outputs have scaling 1 (the scaling is baked into the factors).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from swarmtune.aggregation.taskvec import Adapter, LoraFactors


@dataclass(frozen=True)
class MergeOptions:
    """Method knobs: TIES density, DARE drop rate and seed, task-arithmetic lambda."""

    density: float = 0.2
    drop: float = 0.5
    seed: int = 0
    scale: float = 1.0


MergeResult = LoraFactors | torch.Tensor
MergeFn = Callable[[Sequence[LoraFactors], Sequence[float], MergeOptions, str], MergeResult]
Option = Literal["density", "drop", "seed", "scale"]  # MergeOptions' fields


@dataclass(frozen=True)
class MergeMethod:
    """A merge method and the facts the rest of the code asks about it: whether its result is
    exactly the weighted sum (factors, no SVD), whether its weights form a mean (so cluster
    sizes weigh the clusters, node/clusters/clusterer.py), and which MergeOptions it reads
    (the CLI refuses the others rather than ignore them)."""

    fn: MergeFn
    exact: bool
    weighted_mean: bool
    options: tuple[Option, ...]


MERGE_METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    exact: bool = False,
    weighted_mean: bool = False,
    options: tuple[Option, ...] = (),
) -> Callable[[MergeFn], MergeFn]:
    """Add a merge method under a unique name, with its facts."""

    def add(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise KeyError(f"merge method {name!r} already registered")
        MERGE_METHODS[name] = MergeMethod(fn, exact, weighted_mean, options)
        return fn

    return add


def merge_method(name: str) -> MergeMethod:
    """The method called `name`; KeyError listing the known ones otherwise."""
    if name not in MERGE_METHODS:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def cat_factors(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """sum_i w_i s_i B_i A_i as one pair of factors with scaling 1 (exact)."""
    a = torch.cat([w * f.scaling * f.A.float() for f, w in zip(factors, weights, strict=True)])
    b = torch.cat([f.B.float() for f in factors], dim=1)
    return LoraFactors(a, b, 1.0)


@register("cat", exact=True)
def merge_cat(
    factors: Sequence[LoraFactors], weights: Sequence[float], opts: MergeOptions, module: str
) -> MergeResult:
    """sum_i w_i dW_i, exact."""
    return cat_factors(factors, weights)


@register("linear", exact=True, weighted_mean=True)
def merge_linear(
    factors: Sequence[LoraFactors], weights: Sequence[float], opts: MergeOptions, module: str
) -> MergeResult:
    """sum_i (w_i / sum w) dW_i, exact."""
    total = sum(weights)
    return cat_factors(factors, [w / total for w in weights])


@register("task_arithmetic", exact=True, options=("scale",))
def merge_task_arithmetic(
    factors: Sequence[LoraFactors], weights: Sequence[float], opts: MergeOptions, module: str
) -> MergeResult:
    """lambda * sum_i w_i dW_i, exact."""
    return cat_factors(factors, [opts.scale * w for w in weights])


def trim_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density * n) largest-magnitude entries (ties at the cut are kept)."""
    keep = max(1, math.ceil(density * delta.numel()))
    if keep >= delta.numel():
        return delta.clone()
    cut = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta))


def elect_and_mean(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES steps 2-3: sign of the sum per entry, then mean over the nonzero agreeing entries."""
    stacked = torch.stack(list(deltas))
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(dim=0).clamp_min(1)
    return (stacked * agree).sum(dim=0) / count


def dare_drop(delta: torch.Tensor, drop: float, seed: int, label: str) -> torch.Tensor:
    """Zero each entry with probability `drop` (seeded by label), rescale the rest by 1/(1-drop)."""
    if drop <= 0:
        return delta.clone()
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    keep = torch.rand(delta.shape, generator=gen) >= drop
    return torch.where(keep, delta / (1 - drop), torch.zeros_like(delta))


def _weighted_dense(factors: Sequence[LoraFactors], weights: Sequence[float]) -> list[torch.Tensor]:
    return [w * f.delta_w() for f, w in zip(factors, weights, strict=True)]


@register("ties", options=("density", "scale"))
def merge_ties(
    factors: Sequence[LoraFactors], weights: Sequence[float], opts: MergeOptions, module: str
) -> MergeResult:
    """lambda * disjoint_mean(elect(trim_top(w_i dW_i)))."""
    trimmed = [trim_top(d, opts.density) for d in _weighted_dense(factors, weights)]
    return opts.scale * elect_and_mean(trimmed)


def _dare(
    factors: Sequence[LoraFactors], weights: Sequence[float], opts: MergeOptions, module: str
) -> list[torch.Tensor]:
    dense = _weighted_dense(factors, weights)
    return [dare_drop(d, opts.drop, opts.seed, f"{module}/{i}") for i, d in enumerate(dense)]


@register("dare_linear", weighted_mean=True, options=("drop", "seed", "scale"))
def merge_dare_linear(
    factors: Sequence[LoraFactors], weights: Sequence[float], opts: MergeOptions, module: str
) -> MergeResult:
    """lambda * sum_i DARE(w_i dW_i) / sum w."""
    total = sum(weights)
    return opts.scale * torch.stack(_dare(factors, weights, opts, module)).sum(dim=0) / total


@register("dare_ties", options=("drop", "seed", "scale"))
def merge_dare_ties(
    factors: Sequence[LoraFactors], weights: Sequence[float], opts: MergeOptions, module: str
) -> MergeResult:
    """lambda * disjoint_mean(elect(DARE(w_i dW_i)))."""
    return opts.scale * elect_and_mean(_dare(factors, weights, opts, module))


def refactor(result: MergeResult, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-`rank` factors (truncated SVD, scaling 1) and the energy kept sum s_k^2 / sum s^2.

    Factors are reduced through QR of B and A^T, so dW is never formed for them.
    """
    if isinstance(result, LoraFactors):
        q_b, r_b = torch.linalg.qr(result.B.double() * result.scaling)
        q_a, r_a = torch.linalg.qr(result.A.double().T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        left, right = q_b @ u, vh @ q_a.T
    else:
        left, s, right = torch.linalg.svd(result.double(), full_matrices=False)
    rank = min(rank, s.numel())
    total = float((s * s).sum())
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:rank].sqrt()
    b = (left[:, :rank] * root).float()
    a = (root[:, None] * right[:rank]).float()
    return LoraFactors(a, b, 1.0), kept


@dataclass(frozen=True)
class MergedAdapter:
    """Merged factors per module (scaling 1) and the SVD energy kept where re-factorised."""

    modules: dict[str, LoraFactors]
    energy: dict[str, float]


def merge_adapters(
    adapters: Sequence[Adapter],
    method: str,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    options: MergeOptions | None = None,
) -> MergedAdapter:
    """Merge every module with `method`; dense results (and exact ones when `rank` is given)
    are re-factorised to `rank` (default: the largest input rank)."""
    merge_fn = merge_method(method).fn
    if len(adapters) < 1:
        raise ValueError("need at least one adapter to merge")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters) or (method == "linear" and sum(weights) <= 0):
        raise ValueError(f"need one weight per adapter ({len(adapters)}), got {weights}")
    check_compatible(adapters)
    opts = options or MergeOptions()
    modules: dict[str, LoraFactors] = {}
    energy: dict[str, float] = {}
    for name in sorted(adapters[0]):
        factors = [a[name] for a in adapters]
        result = merge_fn(factors, weights, opts, name)
        target = rank or max(f.rank for f in factors)
        if isinstance(result, torch.Tensor) or (rank is not None and result.rank > rank):
            result, energy[name] = refactor(result, target)
        modules[name] = result
    return MergedAdapter(modules, energy)


def check_compatible(adapters: Sequence[Mapping[str, LoraFactors]]) -> None:
    """Same modules and the same dW shapes in every adapter, or ValueError naming the first clash."""
    first = adapters[0]
    for index, other in enumerate(adapters[1:], start=2):
        if set(other) != set(first):
            diff = sorted(set(other) ^ set(first))[:2]
            raise ValueError(f"adapter {index} covers different modules than adapter 1: {diff}")
        for name in first:
            a, b = first[name], other[name]
            if (a.B.shape[0], a.A.shape[1]) != (b.B.shape[0], b.A.shape[1]):
                raise ValueError(
                    f"adapter {index}, {name}: dW shape {(b.B.shape[0], b.A.shape[1])}"
                    f" != {(a.B.shape[0], a.A.shape[1])} in adapter 1"
                )
