"""Outer optimizers against independent references (torch.optim.SGD)."""

import pytest
import torch

from swarmtune.aggregation.methods import make_outer
from swarmtune.aggregation.outer import FedAvgOuter, MomentumOuter, RoundContext

CTX = RoundContext()
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _random_params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)}


@pytest.mark.parametrize(
    "name,hyper,sgd",
    [
        ("nesterov", {"lr": 0.7, "momentum": 0.9}, {"momentum": 0.9, "nesterov": True}),
        ("nesterov", {"lr": 0.1, "momentum": 0.5}, {"momentum": 0.5, "nesterov": True}),
        ("nesterov", {"lr": 1.0, "momentum": 0.0}, {"momentum": 0.0}),
        ("fedavgm", {"lr": 1.0, "momentum": 0.9}, {"momentum": 0.9}),
        ("fedavgm", {"lr": 0.3, "momentum": 0.5}, {"momentum": 0.5}),
        # GHBM with tau = 1 is classical heavy ball (server form)
        ("ghbm-server", {"lr": 0.5, "beta": 0.9, "tau": 1}, {"momentum": 0.9}),
    ],
)
def test_outer_step_matches_torch_sgd(name: str, hyper: dict, sgd: dict) -> None:
    theta = _random_params(0)
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in theta.items()}
    optimizer = torch.optim.SGD(reference.values(), lr=hyper["lr"], **sgd)
    outer = make_outer(name, **hyper)
    scale = 0.0
    for step in range(8):
        grad = _random_params(100 + step)
        for k, p in reference.items():
            p.grad = grad[k].clone()
        optimizer.step()
        theta = outer.step(theta, grad, CTX)
        scale = max(scale, *(float(p.detach().abs().max()) for p in reference.values()))
        atol = 4 * (step + 1) * EPS32 * scale  # a few fp32 roundings per step, accumulated
        for k in theta:
            torch.testing.assert_close(theta[k], reference[k].detach(), rtol=0, atol=atol)


def test_nesterov_state_round_trip_continues_identically() -> None:
    a, b = MomentumOuter(), MomentumOuter()
    theta = _random_params(1)
    theta_a = a.step(theta, _random_params(2), CTX)
    b.load_state_dict(a.state_dict())
    grad = _random_params(3)
    out_a, out_b = a.step(theta_a, grad, CTX), b.step(theta_a, grad, CTX)
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k])


def test_outer_step_does_not_mutate_inputs() -> None:
    theta, grad = _random_params(4), _random_params(5)
    before = {k: v.clone() for k, v in theta.items()}
    MomentumOuter().step(theta, grad, CTX)
    assert all(torch.equal(theta[k], before[k]) for k in theta)


def test_average_outer_is_theta_minus_lr_delta() -> None:
    theta, delta = _random_params(6), _random_params(7)
    out = FedAvgOuter(lr=1.0).step(theta, delta, CTX)
    assert all(torch.equal(out[k], theta[k] - delta[k]) for k in theta)  # 1.0 * x is exact


def test_make_outer_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError, match="nesterov"):
        make_outer("adamw")


def _adaptive_reference(
    theta: list[float],
    grads: list[list[float]],
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    yogi: bool,
) -> list[float]:
    """Reddi et al. 2021 Algorithm 2, one scalar at a time in float64."""
    x = list(theta)
    m = [0.0] * len(x)
    v = [eps * eps] * len(x)
    for g in grads:
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            if yogi:
                sign = (v[i] > gi * gi) - (v[i] < gi * gi)
                v[i] = v[i] - (1 - b2) * gi * gi * sign
            else:
                v[i] = b2 * v[i] + (1 - b2) * gi * gi
            x[i] = x[i] - lr * m[i] / (v[i] ** 0.5 + eps)
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedadam_and_fedyogi_match_their_formulas_step_by_step(name: str) -> None:
    hyper = {"lr": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-3}
    theta = {"w": torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)}
    grads = [
        {"w": torch.tensor(g, dtype=torch.float64)}
        for g in ([0.1, -0.2, 0.0, 1.0], [0.3, 0.1, -0.5, 1.0], [-0.2, 0.0, 0.2, 0.01])
    ]
    outer = make_outer(name, **hyper)
    for count, grad in enumerate(grads, start=1):
        theta = outer.step(theta, grad, CTX)
        expected = _adaptive_reference(
            [0.5, -1.0, 2.0, 0.0],
            [g["w"].tolist() for g in grads[:count]],
            hyper["lr"],
            hyper["beta1"],
            hyper["beta2"],
            hyper["eps"],
            yogi=name == "fedyogi",
        )
        atol = 16 * count * EPS64 * max(abs(v) for v in expected)  # same float64 operations
        torch.testing.assert_close(
            theta["w"], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=atol
        )


def test_fedyogi_differs_from_fedadam_when_second_moment_shrinks() -> None:
    theta = {"w": torch.tensor([1.0])}
    adam, yogi = make_outer("fedadam"), make_outer("fedyogi")
    out = {}
    for name, opt in (("adam", adam), ("yogi", yogi)):
        x = theta
        for g in (5.0, 0.01, 0.01):
            x = opt.step(x, {"w": torch.tensor([g])}, CTX)
        out[name] = float(x["w"])
    # far above the fp32 rounding of three steps
    assert abs(out["adam"] - out["yogi"]) > 32 * EPS32 * abs(out["adam"])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "ghbm", "ghbm-server"])
def test_every_stateful_outer_round_trips_its_state(name: str) -> None:
    a, b = make_outer(name), make_outer(name)
    theta = _random_params(20)
    for step in range(3):
        theta = a.step(theta, _random_params(30 + step), CTX)
    b.load_state_dict(a.state_dict())
    grad = _random_params(40)
    out_a, out_b = a.step(theta, grad, CTX), b.step(theta, grad, CTX)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_every_method_builds_from_exactly_what_its_descriptor_names() -> None:
    from swarmtune.aggregation.methods import OUTER_METHODS, make_peer_momentum
    from swarmtune.node.config import OuterSettings

    for name, method in OUTER_METHODS.items():
        settings = OuterSettings(name=name)
        assert set(settings.hyperparameters()) == set(method.params), name
        make_outer(name, **settings.hyperparameters())
        momentum = make_peer_momentum(name, settings.effective_momentum, settings.tau)
        assert (momentum is not None) == method.per_peer, name
    # a value the method would not use is refused, not thrown away (local-ghbm / fedhbm
    # used to take any keyword and keep only lr)
    with pytest.raises(TypeError, match="beta"):
        make_outer("fedhbm", lr=1.0, beta=0.9)
    with pytest.raises(TypeError, match="momentum"):
        make_outer("fedavg", lr=1.0, momentum=0.9)
