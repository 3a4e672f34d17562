"""Merge methods against dense references computed directly on dW."""

import math

import pytest
import torch

from swarmtune.aggregation.merge import (
    MERGE_METHODS,
    MergeOptions,
    dare_drop,
    merge_adapters,
    refactor,
    register,
    trim_top,
)
from swarmtune.aggregation.taskvec import LoraFactors

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _factors(seed: int, rank: int, scaling: float, out: int = 9, inp: int = 7) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(
        torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen), scaling
    )


def _adapters() -> list[dict[str, LoraFactors]]:
    """Three adapters with different ranks and scalings over two modules."""
    specs = [(2, 4.0), (4, 0.5), (3, 2.0)]
    return [
        {"q": _factors(i, r, s), "v": _factors(100 + i, r, s, out=5, inp=9)}
        for i, (r, s) in enumerate(specs)
    ]


WEIGHTS = [0.5, 1.0, 2.0]


def _dense(adapters: list, module: str) -> list[torch.Tensor]:
    return [a[module].delta_w().double() for a in adapters]


def _dense64(f: LoraFactors) -> torch.Tensor:
    return f.scaling * (f.B.double() @ f.A.double())


def _abs_product(f: LoraFactors) -> torch.Tensor:
    """s |B| |A|: the entrywise scale of the rounding errors of any fp32 product s B A."""
    return f.scaling * (f.B.double().abs() @ f.A.double().abs())


def _refactored_atol(reference: torch.Tensor, terms: list[torch.Tensor]) -> float:
    """Error bound of a dense fp32 merge of `terms`, re-factorised at full rank, multiplied back.

    A few roundings of entries no larger than sum |terms|, then fp32 factors U sqrt(S) and
    sqrt(S) V^T, whose |B| |A| is at most s_max entrywise, multiplied over r terms.
    """
    rank = min(reference.shape)
    s_max = float(torch.linalg.matrix_norm(reference, ord=2))
    return (rank + 2) * EPS32 * s_max + 4 * EPS32 * float(sum(t.abs() for t in terms).max())


@pytest.mark.parametrize(
    "method,expected_weights",
    [
        ("cat", WEIGHTS),
        ("linear", [w / sum(WEIGHTS) for w in WEIGHTS]),
        ("task_arithmetic", [0.3 * w for w in WEIGHTS]),
    ],
)
def test_exact_methods_match_the_dense_weighted_sum(
    method: str, expected_weights: list[float]
) -> None:
    adapters = _adapters()
    merged = merge_adapters(adapters, method, WEIGHTS, options=MergeOptions(scale=0.3))
    for module in ("q", "v"):
        factors = [a[module] for a in adapters]
        pairs = list(zip(expected_weights, factors, strict=True))
        reference = sum(w * _dense64(f) for w, f in pairs)
        scale = sum(abs(w) * _abs_product(f) for w, f in pairs)
        out = merged.modules[module]
        assert out.scaling == 1.0 and out.rank == 2 + 4 + 3
        atol = (out.rank + 2) * EPS32 * float(scale.max())  # fp32 product over rank 9
        torch.testing.assert_close(out.delta_w().double(), reference, rtol=0, atol=atol)
    assert merged.energy == {}  # nothing was re-factorised


def _ties_reference(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES written entry by entry: trim each to its top-k magnitudes, elect sign, disjoint mean."""
    flat = [d.flatten().tolist() for d in deltas]
    n = len(flat[0])
    keep = max(1, math.ceil(density * n))
    trimmed = []
    for values in flat:
        cut = sorted((abs(v) for v in values), reverse=True)[keep - 1]
        trimmed.append([v if abs(v) >= cut else 0.0 for v in values])
    merged = []
    for j in range(n):
        column = [t[j] for t in trimmed]
        total = sum(column)
        sign = (total > 0) - (total < 0)
        agreeing = [v for v in column if v != 0 and ((v > 0) - (v < 0)) == sign]
        merged.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(merged, dtype=torch.float64).reshape(deltas[0].shape)


def test_ties_matches_an_entry_by_entry_reference() -> None:
    adapters = _adapters()
    full_rank = 9  # no truncation, so the dense TIES result comes back exactly
    merged = merge_adapters(
        adapters, "ties", WEIGHTS, rank=full_rank, options=MergeOptions(density=0.3)
    )
    for module in ("q", "v"):
        deltas = [w * d for w, d in zip(WEIGHTS, _dense(adapters, module), strict=True)]
        reference = _ties_reference(deltas, 0.3)
        atol = _refactored_atol(reference, deltas)
        torch.testing.assert_close(
            merged.modules[module].delta_w().double(), reference, rtol=0, atol=atol
        )
        assert merged.energy[module] == pytest.approx(1.0, abs=64 * EPS64)  # float64 sums


def test_trim_keeps_the_top_fraction() -> None:
    delta = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    assert torch.equal(trim_top(delta, 0.33), torch.tensor([[0.0, -5.0, 0.0], [2.0, 0.0, 0.0]]))


def test_dare_is_seeded_rescaled_and_unbiased() -> None:
    delta = torch.randn(40, 40, generator=torch.Generator().manual_seed(0))
    first, again = dare_drop(delta, 0.7, 1, "m"), dare_drop(delta, 0.7, 1, "m")
    assert torch.equal(first, again) and not torch.equal(first, dare_drop(delta, 0.7, 2, "m"))
    kept = first != 0
    assert 0.25 < kept.float().mean() < 0.35
    # one fp32 division each (by 1 - 0.7 and by 0.3): relative, as neither side is 0 here
    torch.testing.assert_close(first[kept], delta[kept] / 0.3, rtol=2 * EPS32, atol=0)
    average = sum(dare_drop(delta, 0.7, s, "m") for s in range(400)) / 400
    assert float((average - delta).abs().mean()) < 0.1 * float(delta.abs().mean()) + 0.05


def test_dare_linear_with_zero_drop_is_linear() -> None:
    adapters = _adapters()
    dare = merge_adapters(adapters, "dare_linear", WEIGHTS, rank=9, options=MergeOptions(drop=0.0))
    for module in ("q", "v"):
        terms = [
            w / sum(WEIGHTS) * d for w, d in zip(WEIGHTS, _dense(adapters, module), strict=True)
        ]
        reference = sum(terms)
        atol = _refactored_atol(reference, terms)
        torch.testing.assert_close(
            dare.modules[module].delta_w().double(), reference, rtol=0, atol=atol
        )


def test_dare_ties_is_deterministic_for_a_seed() -> None:
    adapters = _adapters()
    a = merge_adapters(adapters, "dare_ties", options=MergeOptions(seed=5))
    b = merge_adapters(adapters, "dare_ties", options=MergeOptions(seed=5))
    assert all(torch.equal(a.modules[m].delta_w(), b.modules[m].delta_w()) for m in a.modules)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_refactor_is_the_best_rank_r_approximation(rank: int) -> None:
    dense = _factors(7, 6, 1.0).delta_w() + 0.1 * _factors(8, 6, 1.0).delta_w()
    for source in (dense, LoraFactors(_factors(7, 6, 1.0).A, _factors(7, 6, 1.0).B, 1.0)):
        out, energy = refactor(source, rank)
        target = source.double() if isinstance(source, torch.Tensor) else _dense64(source)
        s = torch.linalg.svdvals(target)
        assert out.rank == rank and out.scaling == 1.0
        # float64 on both sides; the energy is in [0, 1]
        expected = float((s[:rank] ** 2).sum() / (s**2).sum())
        assert energy == pytest.approx(expected, abs=64 * EPS64)
        # fp32 factors: |error| <= (rank + 2) eps32 s_max per entry of out's dW, so the squared
        # residual R moves by at most 2 sqrt(R) |E| + |E|^2 with |E| that bound * sqrt(numel)
        residual = float(((out.delta_w().double() - target) ** 2).sum())
        exact = float((s[rank:] ** 2).sum())
        error = (rank + 2) * EPS32 * float(s[0]) * target.numel() ** 0.5
        assert residual == pytest.approx(exact, abs=2 * exact**0.5 * error + error**2)


def test_exact_merge_reduced_by_rank_reports_energy() -> None:
    merged = merge_adapters(_adapters(), "linear", rank=2)
    assert all(f.rank == 2 for f in merged.modules.values())
    assert all(0 < e < 1 for e in merged.energy.values())


def test_incompatible_adapters_are_refused() -> None:
    adapters = _adapters()
    other = dict(adapters[1], v=_factors(9, 4, 1.0, out=6, inp=9))
    with pytest.raises(ValueError, match="dW shape"):
        merge_adapters([adapters[0], other], "cat")
    with pytest.raises(ValueError, match="different modules"):
        merge_adapters([adapters[0], {"q": adapters[1]["q"]}], "cat")
    with pytest.raises(KeyError, match="ties"):
        merge_adapters(adapters, "slerp")
    with pytest.raises(ValueError, match="one weight per adapter"):
        merge_adapters(adapters, "cat", [1.0])


def test_registry_refuses_duplicate_names() -> None:
    assert {"cat", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(
        MERGE_METHODS
    )
    with pytest.raises(KeyError):
        register("cat")(MERGE_METHODS["cat"])
