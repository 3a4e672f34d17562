"""Outer optimizers against independent references (torch.optim.SGD)."""

import pytest
import torch

from aggregation.outer import AverageOuter, NesterovOuter, make_outer


def _random_params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)}


@pytest.mark.parametrize("lr,momentum", [(0.7, 0.9), (0.1, 0.5), (1.0, 0.0)])
def test_nesterov_matches_torch_sgd(lr: float, momentum: float) -> None:
    theta = _random_params(0)
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in theta.items()}
    sgd = torch.optim.SGD(reference.values(), lr=lr, momentum=momentum, nesterov=momentum > 0)
    outer = NesterovOuter(lr=lr, momentum=momentum)
    for step in range(6):
        grad = _random_params(100 + step)
        for k, p in reference.items():
            p.grad = grad[k].clone()
        sgd.step()
        theta = outer.step(theta, grad)
        for k in theta:
            torch.testing.assert_close(theta[k], reference[k].detach(), rtol=1e-6, atol=1e-6)


def test_nesterov_state_round_trip_continues_identically() -> None:
    a, b = NesterovOuter(), NesterovOuter()
    theta = _random_params(1)
    theta_a = a.step(theta, _random_params(2))
    b.load_state_dict(a.state_dict())
    grad = _random_params(3)
    out_a, out_b = a.step(theta_a, grad), b.step(theta_a, grad)
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k])


def test_outer_step_does_not_mutate_inputs() -> None:
    theta, grad = _random_params(4), _random_params(5)
    before = {k: v.clone() for k, v in theta.items()}
    NesterovOuter().step(theta, grad)
    assert all(torch.equal(theta[k], before[k]) for k in theta)


def test_average_outer_is_theta_minus_lr_delta() -> None:
    theta, delta = _random_params(6), _random_params(7)
    out = AverageOuter(lr=1.0).step(theta, delta)
    for k in theta:
        torch.testing.assert_close(out[k], theta[k] - delta[k])


def test_make_outer_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError, match="nesterov"):
        make_outer("adamw")
