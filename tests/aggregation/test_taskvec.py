"""Task-vector algebra against dense references; clustering on planted clusters."""

import math

import pytest
import torch

from swarmtune.aggregation.taskvec import (
    SIGNATURE_DIM,
    LoraFactors,
    adapter_cosine,
    adapter_inner,
    adjusted_rand_index,
    agglomerate,
    auto_cluster,
    cosine_matrix,
    factor_inner,
    sketch,
    sketch_change,
    stable_ids,
)

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _factors(
    seed: int, rank: int = 4, out: int = 12, inp: int = 10, scaling: float = 2.0
) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(
        torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen), scaling
    )


def _adapter(seed: int, rank: int = 4) -> dict[str, LoraFactors]:
    return {"q": _factors(seed, rank), "v": _factors(seed + 1000, rank, out=8, inp=10, scaling=0.5)}


def _dense64(f: LoraFactors) -> torch.Tensor:
    """Reference dW = s B A in float64 (the fp32 factors are exact in float64)."""
    return f.scaling * (f.B.double() @ f.A.double())


def _dense_vector(adapter: dict[str, LoraFactors]) -> torch.Tensor:
    return torch.cat([_dense64(adapter[m]).flatten() for m in sorted(adapter)])


def test_delta_w_is_scaled_b_times_a() -> None:
    f = _factors(0)
    # fp32 matmul over r = 4 terms: |error| <= (r + 1) eps32 * s |B| |A| entrywise
    bound = (f.rank + 1) * EPS32 * f.scaling * (f.B.double().abs() @ f.A.double().abs())
    assert bool(((f.delta_w().double() - _dense64(f)).abs() <= bound).all())
    assert f.delta_w().dtype == torch.float32


@pytest.mark.parametrize("ranks", [(4, 4), (2, 8), (1, 3)])
def test_factor_inner_product_equals_dense_frobenius(ranks: tuple[int, int]) -> None:
    x, y = _factors(1, ranks[0], scaling=1.5), _factors(2, ranks[1], scaling=0.25)
    dense_x, dense_y = _dense64(x), _dense64(y)
    dense = float((dense_x * dense_y).sum())
    # both float64: tens of roundings, each at most eps64 |dW_x| |dW_y| (Cauchy-Schwarz)
    tol = 64 * EPS64 * float(dense_x.norm() * dense_y.norm())
    assert factor_inner(x, y) == pytest.approx(dense, abs=tol)


def test_inner_product_ignores_the_factor_gauge() -> None:
    x, y = _factors(3), _factors(4)
    q = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) + 3 * torch.eye(4)
    x_gauge = LoraFactors(
        torch.linalg.solve(q.double(), x.A.double()), x.B.double() @ q.double(), x.scaling
    )
    # float64 solve: relative error ~ cond(q) eps64
    scale = float(torch.linalg.cond(q.double())) * float(_dense64(x).norm() * _dense64(y).norm())
    assert factor_inner(x_gauge, y) == pytest.approx(factor_inner(x, y), abs=64 * EPS64 * scale)


def test_adapter_cosine_equals_dense_cosine() -> None:
    a, b = _adapter(6), _adapter(7, rank=2)
    va, vb = _dense_vector(a), _dense_vector(b)
    dense = float(va @ vb / (va.norm() * vb.norm()))
    # float64 on both sides; the cosine is near 0 here, so the tolerance is absolute
    assert adapter_cosine(a, b) == pytest.approx(dense, abs=64 * EPS64)
    assert adapter_cosine(a, a) == pytest.approx(1.0, abs=64 * EPS64)
    tol = 64 * EPS64 * float(va.norm() * vb.norm())
    assert adapter_inner(a, b) == pytest.approx(float(va @ vb), abs=tol)
    with pytest.raises(KeyError):
        adapter_inner(a, {"q": a["q"]})


def _mixed(base: dict, other: dict, mix: float) -> dict:
    """mix * base + other per module, as one adapter of twice the rank (cosine with base set
    by `mix`)."""
    return {
        m: LoraFactors(
            torch.cat([base[m].A, other[m].A]),
            torch.cat([mix * base[m].B, other[m].B], dim=1),
            base[m].scaling,
        )
        for m in base
    }


def _pair_with_cosine(seed: int) -> tuple[dict, dict]:
    """Two adapters sharing a component, so their cosines spread over (-1, 1)."""
    base, other = _adapter(seed), _adapter(seed + 1)
    return base, _mixed(base, other, (seed % 7 - 3) / 3.0)


def _sketch_errors(k: int) -> list[float]:
    errors = []
    for seed in range(20):
        x, y = _pair_with_cosine(10 * seed)
        # the per-module sketch alone: room for all 2 k^2 values, so nothing is folded
        sx, sy = sketch(x, k=k, seed=1, dim=2 * k * k), sketch(y, k=k, seed=1, dim=2 * k * k)
        approx = float(sx @ sy / (sx.norm() * sy.norm()))
        errors.append(abs(approx - adapter_cosine(x, y)))
    return errors


@pytest.mark.parametrize("k", [8, 32, 128])
def test_sketch_cosine_error_is_bounded_by_one_over_sqrt_k(k: int) -> None:
    errors = _sketch_errors(k)  # 20 pairs with cosines spread over (-1, 1)
    assert sum(errors) / len(errors) < 0.4 / math.sqrt(k)
    assert max(errors) < 1.2 / math.sqrt(k)


def test_sketch_is_deterministic_and_gauge_invariant() -> None:
    x = _adapter(8)
    q = torch.diag(torch.tensor([2.0, 0.5, 4.0, 1.0]))
    gauge = {m: LoraFactors(torch.linalg.solve(q, f.A), f.B @ q, f.scaling) for m, f in x.items()}
    first = sketch(x, 8, seed=3)
    # q has power-of-two entries, so the gauge is exact; allow the final fp32 rounding twice
    tol = 2 * EPS32 * float(first.abs().max())
    torch.testing.assert_close(sketch(gauge, 8, seed=3), first, rtol=0, atol=tol)
    other = sketch(x, 8, seed=4)  # an independent projection: differences of order the norm
    assert float((first - other).norm()) > 0.5 * float(first.norm())


def _planted(
    noise: float, seed: int = 0, per: int = 3, centers: int = 4
) -> tuple[torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, 64, generator=gen)
    signatures, truth = [], []
    for c in range(centers):
        for _ in range(per):
            signatures.append(means[c] + noise * torch.randn(64, generator=gen))
            truth.append(c)
    return cosine_matrix(signatures), truth


def test_clear_planted_clusters_are_recovered_exactly() -> None:
    similarity, truth = _planted(noise=0.2)
    assert adjusted_rand_index(truth, auto_cluster(similarity)) == 1.0
    assert adjusted_rand_index(truth, agglomerate(similarity, k=4)) == 1.0
    assert adjusted_rand_index(truth, agglomerate(similarity, threshold=0.5)) == 1.0


def test_clustering_degrades_gracefully_with_noise() -> None:
    scores = []
    for noise in (0.2, 1.0, 3.0, 10.0):
        per_seed = [
            adjusted_rand_index(t, agglomerate(s, k=4))
            for s, t in (_planted(noise, seed) for seed in range(3))
        ]
        scores.append(sum(per_seed) / 3)
    assert scores[0] == 1.0 and scores[-1] < 0.5
    assert all(later <= earlier + 0.15 for earlier, later in zip(scores, scores[1:], strict=False))


def test_clustering_is_deterministic_and_labels_by_first_appearance() -> None:
    similarity, _ = _planted(noise=1.0, seed=4)
    first = agglomerate(similarity, k=3)
    assert first == agglomerate(similarity.clone(), k=3) and first[0] == 0
    assert sorted(set(first)) == list(range(len(set(first))))
    with pytest.raises(ValueError):
        agglomerate(similarity)


def test_unstructured_signatures_stay_one_cluster() -> None:
    gen = torch.Generator().manual_seed(9)
    center = torch.randn(64, generator=gen)
    similarity = cosine_matrix([center + 0.01 * torch.randn(64, generator=gen) for _ in range(6)])
    assert auto_cluster(similarity) == [0] * 6


def test_adjusted_rand_index_reference_values() -> None:
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    tol = 64 * EPS64  # a few float64 operations on pair counts of at most C(4, 2) = 6
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7, abs=tol)
    assert adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5, abs=tol)


def test_sketch_change_is_the_sketch_of_the_dense_difference() -> None:
    # independent path: the exact adapter for dW_after - dW_before stacks the factors
    # [B_after, -B_before] [A_after; A_before] (rank r_after + r_before)
    before, after = _adapter(1), _adapter(2)
    stacked = {
        m: LoraFactors(
            torch.cat([after[m].A * after[m].scaling, before[m].A * before[m].scaling]),
            torch.cat([after[m].B, -before[m].B], dim=1),
            1.0,
        )
        for m in before
    }
    change = sketch_change(before, after, k=6, seed=3)
    reference = sketch(stacked, k=6, seed=3).double()
    # fp32 sketches of O(1) entries: a few hundred eps32 of the largest entry
    atol = 512 * EPS32 * float(reference.abs().max())
    torch.testing.assert_close(change, reference, rtol=0, atol=atol)
    assert change.dtype == torch.float64


def test_stable_ids_keep_cluster_numbers_across_versions() -> None:
    previous = {"a": 5, "b": 5, "c": 9, "d": 9}
    relabeled = stable_ids({"a": 0, "b": 0, "c": 1, "d": 1, "e": 2}, previous)
    assert relabeled == {"a": 5, "b": 5, "c": 9, "d": 9, "e": 0}
    assert stable_ids({"a": 1, "b": 0}, {}) == {"a": 0, "b": 1}  # fresh ids by first member


def test_factor_average_error_matches_its_two_member_closed_form_and_vanishes_for_a_shared_a() -> (
    None
):
    from swarmtune.aggregation.taskvec import LoraFactors, factor_average_error

    gen = torch.Generator().manual_seed(3)
    a1, a2 = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
    b1, b2 = torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen)
    members = [LoraFactors(a1, b1, 2.0), LoraFactors(a2, b2, 2.0)]
    # equal weights: mean(B) mean(A) - mean(BA) = -(B1 - B2)(A1 - A2) / 4
    gap = (b1.double() - b2.double()) @ (a1.double() - a2.double()) / 4
    exact = (b1.double() @ a1.double() + b2.double() @ a2.double()) / 2
    expected = float(torch.linalg.matrix_norm(gap) / torch.linalg.matrix_norm(exact))
    assert factor_average_error(members, [1.0, 1.0]) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.1  # independent factors: far from exact
    shared = [LoraFactors(a1, b1, 2.0), LoraFactors(a1, b2, 2.0)]  # FFA-LoRA: one A for all
    assert factor_average_error(shared, [3.0, 1.0]) < 1e-12


def _wide(seed: int, modules: int = 210) -> dict[str, LoraFactors]:
    """As many LoRA modules as SmolLM2-135M with all 7 projections (30 layers x 7)."""
    return {f"layers.{i}.proj": _factors(seed * 1000 + i, out=16, inp=16) for i in range(modules)}


def test_a_signature_of_hundreds_of_modules_is_folded_to_a_fixed_size_and_keeps_cosines() -> None:
    errors = []
    for seed in range(10):
        x = _wide(seed)
        y = _mixed(x, _wide(seed + 100), (seed - 5) / 5)  # cosines spread over (-0.7, 0.6)
        sx, sy = sketch(x, k=6, seed=1), sketch(y, k=6, seed=1)
        assert sx.numel() == SIGNATURE_DIM  # 210 x 36 values before folding
        errors.append(abs(float(sx @ sy / (sx.norm() * sy.norm())) - adapter_cosine(x, y)))
    # the fold adds a Johnson-Lindenstrauss error of order 1/sqrt(SIGNATURE_DIM)
    assert sum(errors) / len(errors) < 1.5 / math.sqrt(SIGNATURE_DIM)
    assert max(errors) < 4 / math.sqrt(SIGNATURE_DIM)


def test_the_change_sketch_is_the_difference_of_sketches_when_folded_too() -> None:
    before, after = _wide(1, modules=40), _wide(2, modules=40)
    change = sketch_change(before, after, 6, 3)
    ends = sketch(after, 6, 3).double(), sketch(before, 6, 3).double()
    reference = ends[0] - ends[1]
    assert change.numel() == SIGNATURE_DIM
    # float32 roundings of the same float64 values: a few eps32 of the largest of them
    scale = max(float(e.abs().max()) for e in ends)
    torch.testing.assert_close(change, reference, rtol=0, atol=4 * EPS32 * scale)


def test_small_clusters_join_the_cluster_they_are_most_similar_to() -> None:
    from swarmtune.aggregation.taskvec import absorb_small_clusters

    # items 0-1: a pair (a volunteer and its signature's copy); 2-4 and 5-7: two triples; the
    # pair is closer to the first triple
    close = torch.full((8, 8), 0.0)
    for group in ([0, 1], [2, 3, 4], [5, 6, 7]):
        for i in group:
            for j in group:
                close[i, j] = 1.0
    close[0:2, 2:5] = close[2:5, 0:2] = 0.5
    close[0:2, 5:8] = close[5:8, 0:2] = 0.1
    labels = [0, 0, 1, 1, 1, 2, 2, 2]
    assert absorb_small_clusters(close, labels, 1) == labels  # the default leaves them be
    assert absorb_small_clusters(close, labels, 2) == labels
    assert absorb_small_clusters(close, labels, 3) == [0, 0, 0, 0, 0, 1, 1, 1]
    # nothing may be left alone: the last clusters still merge when every one is too small
    assert absorb_small_clusters(close, labels, 4) == [0] * 8
    assert absorb_small_clusters(close[:2, :2], [0, 1], 3) == [0, 0]
