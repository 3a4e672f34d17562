"""Task-vector algebra against dense references; clustering on planted clusters."""

import math

import pytest
import torch

from aggregation.taskvec import (
    LoraFactors,
    adapter_cosine,
    adapter_inner,
    adjusted_rand_index,
    agglomerate,
    auto_cluster,
    cosine_matrix,
    factor_inner,
    sketch,
)


def _factors(
    seed: int, rank: int = 4, out: int = 12, inp: int = 10, scaling: float = 2.0
) -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(
        torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen), scaling
    )


def _adapter(seed: int, rank: int = 4) -> dict[str, LoraFactors]:
    return {"q": _factors(seed, rank), "v": _factors(seed + 1000, rank, out=8, inp=10, scaling=0.5)}


def _dense_vector(adapter: dict[str, LoraFactors]) -> torch.Tensor:
    return torch.cat([adapter[m].delta_w().double().flatten() for m in sorted(adapter)])


def test_delta_w_is_scaled_b_times_a() -> None:
    f = _factors(0)
    torch.testing.assert_close(f.delta_w(), 2.0 * f.B @ f.A)


@pytest.mark.parametrize("ranks", [(4, 4), (2, 8), (1, 3)])
def test_factor_inner_product_equals_dense_frobenius(ranks: tuple[int, int]) -> None:
    x, y = _factors(1, ranks[0], scaling=1.5), _factors(2, ranks[1], scaling=0.25)
    dense = float((x.delta_w().double() * y.delta_w().double()).sum())
    assert factor_inner(x, y) == pytest.approx(dense, rel=1e-6)


def test_inner_product_ignores_the_factor_gauge() -> None:
    x, y = _factors(3), _factors(4)
    q = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) + 3 * torch.eye(4)
    x_gauge = LoraFactors(
        torch.linalg.solve(q.double(), x.A.double()), x.B.double() @ q.double(), x.scaling
    )
    assert factor_inner(x_gauge, y) == pytest.approx(factor_inner(x, y), rel=1e-8)


def test_adapter_cosine_equals_dense_cosine() -> None:
    a, b = _adapter(6), _adapter(7, rank=2)
    va, vb = _dense_vector(a), _dense_vector(b)
    dense = float(va @ vb / (va.norm() * vb.norm()))
    assert adapter_cosine(a, b) == pytest.approx(dense, rel=1e-6)
    assert adapter_cosine(a, a) == pytest.approx(1.0)
    assert adapter_inner(a, b) == pytest.approx(float(va @ vb), rel=1e-6)
    with pytest.raises(KeyError):
        adapter_inner(a, {"q": a["q"]})


def _pair_with_cosine(seed: int) -> tuple[dict, dict]:
    """Two adapters sharing a component, so their cosines spread over (-1, 1)."""
    base, other = _adapter(seed), _adapter(seed + 1)
    mix = (seed % 7 - 3) / 3.0
    mixed = {
        m: LoraFactors(
            torch.cat([base[m].A, other[m].A]),
            torch.cat([mix * base[m].B, other[m].B], dim=1),
            base[m].scaling,
        )
        for m in base
    }
    return base, mixed


def _sketch_errors(k: int) -> list[float]:
    errors = []
    for seed in range(20):
        x, y = _pair_with_cosine(10 * seed)
        sx, sy = sketch(x, k=k, seed=1), sketch(y, k=k, seed=1)
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
    torch.testing.assert_close(sketch(x, 8, seed=3), sketch(gauge, 8, seed=3), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sketch(x, 8, seed=3), sketch(x, 8, seed=4))


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
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert math.isclose(adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]), -0.5)
