"""Server-side outer optimizers: theta^t = step(theta^{t-1}, Delta), Delta = mean pseudo-gradient.

- FedAvg (McMahan et al. 2017): theta - lr * Delta; lr = 1 is plain averaging.
- FedAvgM (Hsu et al. 2019, arXiv 1909.06335): heavy ball on Delta, v <- mu*v + Delta.
- Nesterov (DiLoCo, Douillard et al. 2023, arXiv 2311.08105): lr 0.7, momentum 0.9.
- FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2):
  m <- b1*m + (1-b1)*Delta; v <- b2*v + (1-b2)*Delta^2 (Adam) or
  v <- v - (1-b2)*Delta^2*sign(v - Delta^2) (Yogi); theta <- theta - lr*m/(sqrt(v)+eps),
  with v initialised to eps^2 and no bias correction, as in the paper.
GHBM and its variants live in aggregation/ghbm.py; aggregation/methods.py names them all. Every optimizer is a small class with
step / state_dict / load_state_dict; inputs are never mutated, so every group member computes
the same theta^t from the same Delta.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from swarmtune.aggregation.params import Params

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class RoundContext:
    """What the group agreed on about a round: who took part out of how many known peers."""

    participants: int = 1
    population: int = 1


class OuterOptimizer(Protocol):
    """theta^t = step(theta^{t-1}, pseudo_gradient); state is part of the group state."""

    def step(self, params: Tensors, pseudo_grad: Tensors, context: RoundContext) -> Params: ...
    def inner_correction(self, params: Tensors, inner_steps: int) -> Params | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _copy(tensors: Tensors) -> Params:
    return {k: v.detach().clone().float() for k, v in tensors.items()}


class _ServerOnly:
    """Outer optimizers that leave the inner loop alone."""

    def inner_correction(self, params: Tensors, inner_steps: int) -> Params | None:
        """No per-step correction."""
        return None


class FedAvgOuter(_ServerOnly):
    """theta <- theta - lr * Delta (lr = 1 is plain averaging)."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(self, params: Tensors, pseudo_grad: Tensors, context: RoundContext) -> Params:
        """theta - lr * Delta."""
        return {k: params[k] - self.lr * pseudo_grad[k] for k in sorted(params)}

    def state_dict(self) -> dict[str, Any]:
        """Stateless: only the hyperparameters."""
        return {"lr": self.lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the hyperparameters."""
        self.lr = float(state["lr"])


class MomentumOuter(_ServerOnly):
    """v <- mu*v + Delta; theta <- theta - lr*v (FedAvgM), or - lr*(Delta + mu*v) with Nesterov.

    Both match torch.optim.SGD(momentum=mu, nesterov=...) with Delta as the gradient.
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.buffer: Params = {}

    def step(self, params: Tensors, pseudo_grad: Tensors, context: RoundContext) -> Params:
        """One momentum step; the first step seeds the buffer with Delta, like torch SGD."""
        new_params: Params = {}
        new_buffer: Params = {}
        for k in sorted(params):
            g = pseudo_grad[k]
            prev = self.buffer.get(k)
            buf = g.clone() if prev is None else prev * self.momentum + g
            new_buffer[k] = buf
            direction = g + self.momentum * buf if self.nesterov else buf
            new_params[k] = params[k] - self.lr * direction
        self.buffer = new_buffer
        return new_params

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and the momentum buffer (tensors cloned)."""
        return {"lr": self.lr, "momentum": self.momentum, "buffer": _copy(self.buffer)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore hyperparameters and buffer."""
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self.buffer = _copy(state.get("buffer", {}))


class AdaptiveOuter(_ServerOnly):
    """FedAdam (yogi=False) or FedYogi (yogi=True), Reddi et al. 2021, Algorithm 2."""

    def __init__(
        self,
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-3,
        yogi: bool = False,
    ) -> None:
        self.lr, self.beta1, self.beta2, self.eps, self.yogi = lr, beta1, beta2, eps, yogi
        self.m: Params = {}
        self.v: Params = {}

    def _second_moment(self, v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        if self.yogi:
            return v - (1 - self.beta2) * g2 * torch.sign(v - g2)
        return self.beta2 * v + (1 - self.beta2) * g2

    def step(self, params: Tensors, pseudo_grad: Tensors, context: RoundContext) -> Params:
        """theta - lr * m / (sqrt(v) + eps)."""
        new_params: Params = {}
        new_m: Params = {}
        new_v: Params = {}
        for k in sorted(params):
            g = pseudo_grad[k]
            m = self.m.get(k, torch.zeros_like(g))
            v = self.v.get(k, torch.full_like(g, self.eps**2))
            new_m[k] = self.beta1 * m + (1 - self.beta1) * g
            new_v[k] = self._second_moment(v, g * g)
            new_params[k] = params[k] - self.lr * new_m[k] / (new_v[k].sqrt() + self.eps)
        self.m, self.v = new_m, new_v
        return new_params

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and both moment estimates."""
        return {
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "m": _copy(self.m),
            "v": _copy(self.v),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore hyperparameters and moments."""
        self.lr, self.eps = float(state["lr"]), float(state["eps"])
        self.beta1, self.beta2 = float(state["beta1"]), float(state["beta2"])
        self.m, self.v = _copy(state.get("m", {})), _copy(state.get("v", {}))
