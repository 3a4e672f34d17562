"""Step normalisation (aggregation/steps.py) against FedNova's update, written out."""

import statistics

import pytest
import torch

from swarmtune.aggregation.params import weighted_mean
from swarmtune.aggregation.steps import agreed_deadline, normalize_steps


def _deltas(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"a": torch.randn(6, 4, generator=gen) * 1e-3, "b": torch.randn(9, generator=gen)}
        for _ in range(n)
    ]


def test_the_normalised_mean_is_fednovas_update_with_equal_shares_at_the_median() -> None:
    deltas, steps = _deltas(4, seed=1), [20.0, 5.0, 20.0, 12.0]
    scaled, weights = normalize_steps(deltas, steps)
    got = weighted_mean(scaled, weights)
    # FedNova, p_i = 1/n: tau_eff * sum_i p_i Delta_i / tau_i, with tau_eff the upper median of
    # the claims (20 of 5, 12, 20, 20) in place of their mean
    n = len(deltas)
    tau_eff = 20.0
    for key in got:
        want = tau_eff * sum(d[key].double() / t for d, t in zip(deltas, steps, strict=True)) / n
        scale = float(want.abs().max())
        eps = torch.finfo(deltas[0][key].dtype).eps
        assert torch.allclose(got[key].double(), want, rtol=0, atol=8 * eps * scale)


def test_a_slow_member_counts_as_much_as_a_fast_one_on_one_gradient() -> None:
    # plain local steps on one fixed gradient g: Delta_i = tau_i * lr * g; normalised, every
    # member sends tau_eff * lr * g, whatever its speed
    g = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    steps = [20.0, 20.0, 20.0, 5.0]
    deltas = [{"w": t * 0.01 * g["w"]} for t in steps]
    scaled, weights = normalize_steps(deltas, steps)
    tau_eff = 20.0  # the median claim
    for s in scaled:
        assert torch.allclose(s["w"], tau_eff * 0.01 * g["w"], rtol=1e-12, atol=0)
    assert weights == [tau_eff] * 4


def test_equal_steps_leave_every_contribution_untouched() -> None:
    deltas = _deltas(3, seed=2)
    scaled, weights = normalize_steps(deltas, [20, 20, 20])
    assert all(s is d for s, d in zip(scaled, deltas, strict=True))
    assert weighted_mean(scaled, weights)["a"].equal(weighted_mean(deltas, [20, 20, 20])["a"])


def test_identities_claiming_one_step_do_not_shrink_the_honest_contributions() -> None:
    # with the mean of the claims, two of five identities claiming 1 step would scale every
    # honest Delta by 0.62; the median is the honest members' 20
    deltas = _deltas(5, seed=3)
    scaled, _ = normalize_steps(deltas, [20, 20, 20, 1, 1])
    assert all(scaled[i] is deltas[i] for i in range(3))


@pytest.mark.parametrize("steps", [[20, 0], [20, -1], [20, 0.5], [20, float("nan")], [20]])
def test_bad_step_counts_are_refused(steps: list[float]) -> None:
    with pytest.raises(ValueError):
        normalize_steps(_deltas(2), steps)


def test_the_agreed_deadline_is_h_times_the_upper_median_step_time() -> None:
    times = [0.21, 0.2, 0.9, 0.19]  # one member at about a quarter of the others' speed
    assert agreed_deadline(times, 20) == 20 * statistics.median_high(times) == 20 * 0.21
    assert agreed_deadline([0.2, 0.8], 10) == 10 * 0.8  # a pair: the longer of the two
    # a member that did not say (0) or said nonsense is left out; nobody left: no deadline
    assert agreed_deadline([0.2, 0.0, float("nan"), -1.0, 0.3], 10) == 10 * 0.3
    assert agreed_deadline([0.0, float("inf")], 10) is None
    assert agreed_deadline([80_000.0, 90_000.0], 20) == 86_400.0  # never past the config's most


def test_a_minority_cannot_move_the_deadline_outside_the_honest_times() -> None:
    honest = [0.2, 0.25, 0.3]
    for claim in (1e-9, 1e6):
        got = agreed_deadline([*honest, claim, claim], 10)
        assert got is not None and 10 * min(honest) <= got <= 10 * max(honest)
