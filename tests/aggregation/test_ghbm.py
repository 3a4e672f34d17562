"""GHBM (both forms, tau fixed and auto) and the per-peer variants against hand-derived references."""

import pytest
import torch

from swarmtune.aggregation.ghbm import GHBMOuter, PeerMomentum, tau_from_participation
from swarmtune.aggregation.methods import make_outer
from swarmtune.aggregation.outer import RoundContext

CTX = RoundContext()
EPS32 = torch.finfo(torch.float32).eps


def _params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(6, generator=gen)}


def _sub(x: dict, y: dict) -> dict:
    return {k: x[k] - y[k] for k in x}


def _max_abs(*params: dict) -> float:
    return max(float(v.detach().abs().max()) for p in params for v in p.values())


def test_local_form_with_tau_1_and_one_inner_step_is_torch_heavy_ball() -> None:
    """H = 1 SGD inner step at lr eta: theta^t = theta^{t-1} - eta g + beta (theta^{t-1} - theta^{t-2})."""
    eta, beta = 0.1, 0.8
    target = _params(1)
    theta = _params(2)
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in theta.items()}
    sgd = torch.optim.SGD(reference.values(), lr=eta, momentum=beta)
    outer = make_outer("ghbm", lr=1.0, beta=beta, tau=1)
    scale = _max_abs(target)
    for step in range(8):
        grad = _sub(theta, target)  # gradient of 0.5 * ||theta - target||^2
        correction = outer.inner_correction(theta, 1) or {
            k: torch.zeros_like(v) for k, v in theta.items()
        }
        local = {k: theta[k] - eta * grad[k] - correction[k] for k in theta}
        theta = outer.step(theta, _sub(theta, local), CTX)
        for k, p in reference.items():
            p.grad = (p.detach() - target[k]).clone()
        sgd.step()
        scale = max(scale, _max_abs(theta))
        atol = 4 * (step + 1) * EPS32 * scale  # a few fp32 roundings per step, accumulated
        for k in theta:
            torch.testing.assert_close(theta[k], reference[k].detach(), rtol=0, atol=atol)


@pytest.mark.parametrize("tau,inner_steps", [(1, 5), (3, 4), (5, 7)])
def test_local_correction_over_h_steps_adds_the_generalized_momentum(
    tau: int, inner_steps: int
) -> None:
    outer = GHBMOuter(lr=1.0, beta=0.9, tau=tau, form="local")
    states = [_params(10)]
    for step in range(tau + 3):  # more rounds than tau, so the ring is full
        states.append(outer.step(states[-1], _params(20 + step), CTX))
    current = states[-1]
    correction = outer.inner_correction(current, inner_steps)
    assert correction is not None
    local = dict(current)
    for _ in range(inner_steps):  # zero gradients: only the correction moves theta
        local = {k: local[k] - correction[k] for k in local}
    expected = {k: 0.9 / tau * (current[k] - states[-1 - tau][k]) for k in current}
    atol = 4 * inner_steps * EPS32 * _max_abs(current, states[-1 - tau])  # H fp32 subtractions
    for k in current:
        torch.testing.assert_close(local[k] - current[k], expected[k], rtol=0, atol=atol)


def test_local_and_server_forms_agree_when_inner_gradients_are_zero() -> None:
    local, server = GHBMOuter(tau=2, form="local"), GHBMOuter(tau=2, form="server")
    theta_l = theta_s = _params(3)
    scale = 0.0
    for step in range(5):
        delta = _params(50 + step)
        correction = local.inner_correction(theta_l, 4)
        shift = (
            {k: 4 * correction[k] for k in theta_l}
            if correction
            else {k: 0 * v for k, v in theta_l.items()}
        )
        theta_l = local.step(theta_l, {k: delta[k] + shift[k] for k in delta}, CTX)
        theta_s = server.step(theta_s, delta, CTX)
        scale = max(scale, _max_abs(theta_s, delta))
        atol = 4 * (step + 1) * EPS32 * scale  # a few fp32 roundings per round, accumulated
        for k in theta_l:
            torch.testing.assert_close(theta_l[k], theta_s[k], rtol=0, atol=atol)


def test_ring_keeps_tau_plus_one_states_and_pads_with_the_oldest() -> None:
    outer = GHBMOuter(tau=4, form="server")
    theta = _params(4)
    assert outer.inner_correction(theta, 3) is None  # server form: nothing inside the inner loop
    first = outer.momentum(theta)
    assert all(torch.count_nonzero(v) == 0 for v in first.values())  # no history, no momentum
    for step in range(9):
        theta = outer.step(theta, _params(60 + step), CTX)
    assert len(outer.history) == 5
    assert all(torch.equal(outer.history[-1][k], theta[k]) for k in theta)


def test_tau_auto_follows_measured_participation() -> None:
    outer = GHBMOuter(tau="auto", tau_max=20)
    assert outer.tau == 1
    theta = _params(5)
    for step in range(12):
        theta = outer.step(theta, _params(70 + step), RoundContext(participants=10, population=100))
    assert outer.tau == 10
    assert outer.state_dict()["tau_next"] == 10
    assert len(outer.history) <= 21
    assert tau_from_participation(0.0, 7) == 7 and tau_from_participation(0.3, 20) == 3


def test_tau_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tau"):
        GHBMOuter(tau=0)


def test_local_ghbm_uses_the_global_state_from_the_previous_participation() -> None:
    peer = PeerMomentum("local-ghbm", beta=0.9, tau="auto")
    first, later = _params(6), _params(7)
    peer.begin_round(first, 2)
    assert peer.correction(first, 5) is None  # first participation: no anchor yet
    peer.end_round(_params(8), 2)
    peer.begin_round(later, 6)  # took part again 4 rounds later
    correction = peer.correction(_params(9), 5)  # independent of the current iterate
    assert correction is not None
    atol = 4 * EPS32 * 0.9 / (5 * 4) * _max_abs(first, later)  # one difference, one product
    for k in later:
        expected = 0.9 / (5 * 4) * (first[k] - later[k])
        torch.testing.assert_close(correction[k], expected, rtol=0, atol=atol)


def test_fedhbm_uses_its_own_last_local_state_and_the_current_iterate() -> None:
    peer = PeerMomentum("fedhbm", beta=1.0, tau=10)
    peer.begin_round(_params(10), 0)
    assert peer.correction(_params(11), 4) is None
    own_result = _params(12)
    peer.end_round(own_result, 0)
    peer.begin_round(_params(13), 3)
    iterate = _params(14)
    correction = peer.correction(iterate, 4)
    assert correction is not None
    atol = 4 * EPS32 * 1.0 / (4 * 10) * _max_abs(own_result, iterate)
    for k in iterate:
        expected = 1.0 / (4 * 10) * (own_result[k] - iterate[k])
        torch.testing.assert_close(correction[k], expected, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["local-ghbm", "fedhbm"])
def test_peer_momentum_state_round_trips(kind: str) -> None:
    a = PeerMomentum(kind, beta=0.9, tau="auto")  # type: ignore[arg-type]
    a.begin_round(_params(15), 1)
    a.end_round(_params(16), 1)
    b = PeerMomentum(kind, beta=0.9, tau="auto")  # type: ignore[arg-type]
    b.load_state_dict(a.state_dict())
    for peer in (a, b):
        peer.begin_round(_params(17), 3)
    ca, cb = a.correction(_params(18), 2), b.correction(_params(18), 2)
    assert ca is not None and cb is not None
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    with pytest.raises(ValueError, match="fedhbm|local-ghbm"):
        PeerMomentum("fedhbm" if kind == "local-ghbm" else "local-ghbm", 0.9, 1).load_state_dict(
            a.state_dict()
        )


def test_group_step_of_peer_variants_is_plain_averaging() -> None:
    theta, delta = _params(19), _params(20)
    out = make_outer("fedhbm", lr=1.0).step(theta, delta, CTX)
    assert all(torch.equal(out[k], theta[k] - delta[k]) for k in theta)  # 1.0 * x is exact


@pytest.mark.parametrize("kind", ["local-ghbm", "fedhbm"])
def test_a_retried_round_counts_its_anchor_as_one_round_old_also_after_a_restart(
    kind: str,
) -> None:
    """An abandoned round 3, then a sync to round 3 again: gap 0 must act as tau 1, not crash."""
    peer = PeerMomentum(kind, beta=0.9, tau="auto")  # type: ignore[arg-type]
    received, own, retry, iterate = _params(21), _params(22), _params(23), _params(24)
    peer.begin_round(received, 3)
    peer.end_round(own, 3)  # the round is abandoned after the inner loop
    restarted = PeerMomentum(kind, beta=0.9, tau="auto")  # type: ignore[arg-type]
    restarted.load_state_dict(peer.state_dict())  # the checkpoint written after that round
    anchor, moved = (received, retry) if kind == "local-ghbm" else (own, iterate)
    for p in (peer, restarted):
        p.begin_round(retry, 3)
        correction = p.correction(iterate, 5)
        assert correction is not None
        for k in iterate:
            expected = 0.9 / 5 * (anchor[k] - moved[k])
            atol = 4 * EPS32 * 0.9 / 5 * _max_abs(anchor, moved)  # one difference, one product
            torch.testing.assert_close(correction[k], expected, rtol=0, atol=atol)


def test_peer_momentum_loads_a_state_without_an_anchor_as_none() -> None:
    peer = PeerMomentum("fedhbm", beta=1.0, tau="auto")
    peer.load_state_dict({"kind": "fedhbm", "anchor_round": 5, "anchor": {}})
    assert peer.anchor_round == -1
    peer.begin_round(_params(25), 5)
    assert peer.correction(_params(26), 3) is None
    with pytest.raises(ValueError, match="tau"):
        PeerMomentum("fedhbm", beta=1.0, tau=0)
