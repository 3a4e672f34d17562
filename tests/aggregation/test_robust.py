"""Robust aggregation against independent references and under attack."""

import math

import pytest
import torch

from swarmtune.aggregation.params import weighted_mean
from swarmtune.aggregation.robust import (
    TAU_FLOOR,
    bound_norms,
    centered_clip,
    median_of,
    stable_norm,
    weighted_median,
    without_empty,
)

EPS32 = torch.finfo(torch.float32).eps


def _honest(n: int, seed: int = 0, scale: float = 1e-3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    mean = {"a": torch.randn(16, 8, generator=gen), "b": torch.randn(40, generator=gen)}
    return [
        {k: (v + 0.3 * torch.randn(v.shape, generator=gen)) * scale for k, v in mean.items()}
        for _ in range(n)
    ]


def _norm(x: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in x.values()))


def _minus(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: x[k].double() - y[k].double() for k in x}


def test_weighted_median_matches_a_per_coordinate_reference() -> None:
    xs = _honest(5, seed=1)
    weights = [1.0, 3.0, 1.0, 2.0, 1.0]
    median = weighted_median(xs, weights)
    for k in xs[0]:
        for j in range(xs[0][k].numel()):
            pairs = sorted((float(x[k].flatten()[j]), w) for x, w in zip(xs, weights, strict=True))
            below = [sum(w for _, w in pairs[: i + 1]) for i in range(len(pairs))]
            half = sum(weights) / 2
            first = next(i for i, b in enumerate(below) if b >= half)
            # the first value whose cumulative weight reaches half; the midpoint with the next
            # one where it reaches exactly half
            reference = pairs[first][0]
            if below[first] == half:
                reference = (reference + pairs[first + 1][0]) / 2
            assert float(median[k].flatten()[j]) == reference


def test_without_clipping_one_step_is_the_weighted_mean() -> None:
    xs = _honest(4, seed=2)
    weights = [512.0, 1024.0, 768.0, 256.0]
    result, _ = centered_clip(xs, weights, clip_scale=1e12, iterations=1)
    reference = weighted_mean(xs, weights)
    for k in xs[0]:
        # float64 arithmetic from fp32 inputs, one rounding to fp32: ~eps32 of the entries
        atol = 4 * EPS32 * float(reference[k].abs().max())
        torch.testing.assert_close(result[k], reference[k], rtol=0, atol=atol)


@pytest.mark.parametrize("attack", [1e3, -10.0, 1e6])
def test_one_attacker_in_four_moves_the_result_by_a_bounded_amount(attack: float) -> None:
    honest = _honest(3, seed=3)
    honest_mean = weighted_mean(honest, [1.0] * 3)
    attacker = {k: v * attack for k, v in honest_mean.items()}
    robust, tau = centered_clip([*honest, attacker], [1.0] * 4)
    plain = weighted_mean([*honest, attacker], [1.0] * 4)
    spread = max(_norm(_minus(h, honest_mean)) for h in honest)
    pull = _norm(_minus(robust, honest_mean))
    # the documented bound: 3 iterations x weight share 1/4 x tau, plus the honest spread
    assert pull <= 3 * 0.25 * tau + spread
    assert tau <= 4 * spread  # tau is set by honest distances, not by the attacker
    assert _norm(_minus(plain, honest_mean)) > 2 * pull  # the plain mean is dragged away


def test_same_inputs_same_bits() -> None:
    xs = _honest(4, seed=4)
    first, tau1 = centered_clip(xs, [1.0, 2.0, 1.0, 1.0])
    again, tau2 = centered_clip(
        [{k: v.clone() for k, v in x.items()} for x in xs], [1.0, 2.0, 1.0, 1.0]
    )
    assert tau1 == tau2 and all(torch.equal(first[k], again[k]) for k in first)


def test_stable_norm_keeps_30_bits_and_is_idempotent() -> None:
    for value in [1.0, 3.14159265358979, 1e-9, 123456.789]:
        rounded = stable_norm(value)
        assert abs(rounded - value) <= value * 2.0**-30
        assert stable_norm(rounded) == rounded
    assert stable_norm(0.0) == 0.0


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError):
        centered_clip(_honest(2), [1.0, 0.0])
    with pytest.raises(ValueError):
        centered_clip([], [])


def test_norm_bound_scales_only_the_long_ones_to_the_median_norm() -> None:
    xs = _honest(5, seed=5)
    weights = [1.0, 1.0, 1.0, 1.0, 1.0]
    norms = [_norm(x) for x in xs]
    median = sorted(norms)[2]
    bounded, limit = bound_norms(xs, weights, factor=1.0)
    assert limit == pytest.approx(median, rel=2.0**-29)  # 30 significant bits
    for x, b, n in zip(xs, bounded, norms, strict=True):
        if n <= limit:
            assert all(torch.equal(b[k], x[k].double()) for k in x)
        else:  # same direction, length the limit (norms steer at 30 significant bits)
            assert _norm(b) == pytest.approx(limit, rel=2.0**-28)
            assert torch.allclose(b["a"] * (n / limit), x["a"].double(), rtol=2.0**-28, atol=0)


@pytest.mark.parametrize("attack", [-10.0, 50.0, 1e6])
def test_norm_bound_limits_a_members_pull_to_its_share_of_the_limit(attack: float) -> None:
    honest = _honest(3, seed=6)
    weights = [256.0, 256.0, 256.0, 256.0]
    liar = {k: v * attack for k, v in honest[0].items()}
    stand_in = honest[1]  # what an honest member could have sent instead
    with_liar, limit = bound_norms([*honest, liar], weights)
    with_honest, _ = bound_norms([*honest, stand_in], weights)
    moved = _norm(_minus(weighted_mean(with_liar, weights), weighted_mean(with_honest, weights)))
    share = weights[-1] / sum(weights)
    # replacing one member moves the mean by at most 2 x its share x the limit; the
    # limit itself is an honest norm (the attacker holds less than half the weight)
    assert moved <= 2 * share * limit * (1 + 1e-6)
    assert min(_norm(h) for h in honest) <= limit <= max(_norm(h) for h in honest)


def _defended(xs: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """What a member applies under the default rule (round.combine): zero updates dropped,
    norms bounded at 1x the median, CenteredClip."""
    kept, kept_weights = without_empty(xs, weights)
    bounded, _ = bound_norms(kept, kept_weights, factor=1.0)
    return centered_clip(bounded, kept_weights)[0]


def _cosine(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    dot = sum(float((x[k].double() * y[k].double()).sum()) for k in x)
    return dot / (_norm(x) * _norm(y))


def test_half_the_weight_sending_zeros_is_ignored() -> None:
    honest = _honest(3, seed=7)
    zeros = [{k: torch.zeros_like(v) for k, v in honest[0].items()}] * 3
    alone = _defended(honest, [1.0] * 3)
    with_zeros = _defended([*honest, *zeros], [1.0] * 6)
    # the lower median norm used to be 0 here, scaling every honest update to nothing
    assert all(torch.equal(with_zeros[k], alone[k]) for k in alone)


def test_at_an_exact_half_tie_longer_updates_cannot_raise_the_norm_limit() -> None:
    honest = _honest(3, seed=8)
    longer = [{k: -10 * v for k, v in h.items()} for h in honest]
    _, limit = bound_norms([*honest, *longer], [1.0] * 6)
    # the lower of the two middle norms: the longest honest one, not a midpoint 5x above it
    assert limit == pytest.approx(max(_norm(h) for h in honest), rel=2.0**-28)


def test_identical_contributions_cannot_shrink_tau_to_nothing() -> None:
    honest = _honest(3, seed=9)
    same = [honest[0]] * 4  # a strict majority identical: the median distance is 0
    xs = [*honest, *same]
    _, tau = centered_clip(xs, [1.0] * 7)
    norms = sorted(_norm(x) for x in xs)
    assert tau == pytest.approx(TAU_FLOOR * norms[3], rel=2.0**-28)
    assert tau > 0


def test_a_weighted_median_at_an_exact_half_tie_is_the_midpoint() -> None:
    assert median_of([1.0, 3.0], [2.0, 2.0]) == 2.0
    assert median_of([5.0, 1.0, 3.0], [2.0, 1.0, 1.0]) == 4.0  # 1 and 3 hold exactly half
    assert median_of([1.0, 3.0, 5.0], [1.0, 3.0, 1.0]) == 3.0  # no tie: a strict majority
    xs = [{"a": torch.tensor([0.0, 4.0])}, {"a": torch.tensor([2.0, 0.0])}]
    assert weighted_median(xs, [1.0, 1.0])["a"].tolist() == [1.0, 2.0]
    assert weighted_median(xs, [1.0, 3.0])["a"].tolist() == [2.0, 0.0]
