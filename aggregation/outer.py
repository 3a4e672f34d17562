"""Outer optimizers for DiLoCo rounds: theta^t = step(theta^{t-1}, Delta).

DiLoCo (Douillard et al. 2023, arXiv 2311.08105) uses SGD with Nesterov momentum as the outer
optimizer (lr 0.7, momentum 0.9); plain averaging (FedAvg, McMahan et al. 2017) is lr 1, no momentum.
Every optimizer is a small stateful class: step / state_dict / load_state_dict; inputs are never
mutated, so every group member computes the same theta^t from the same Delta.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from aggregation.params import Params


class OuterOptimizer(Protocol):
    """theta^t = step(theta^{t-1}, pseudo_gradient); state is part of the group state."""

    def step(
        self, params: Mapping[str, torch.Tensor], pseudo_grad: Mapping[str, torch.Tensor]
    ) -> Params: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class AverageOuter:
    """FedAvg outer step: theta <- theta - lr * Delta (lr = 1 is plain averaging)."""

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(
        self, params: Mapping[str, torch.Tensor], pseudo_grad: Mapping[str, torch.Tensor]
    ) -> Params:
        """theta - lr * Delta."""
        return {k: params[k] - self.lr * pseudo_grad[k] for k in sorted(params)}

    def state_dict(self) -> dict[str, Any]:
        """Stateless: only the hyperparameters."""
        return {"lr": self.lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the hyperparameters."""
        self.lr = float(state["lr"])


class NesterovOuter:
    """m <- mu*m + g; theta <- theta - lr*(g + mu*m); matches torch.optim.SGD(nesterov=True)."""

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        self.lr = lr
        self.momentum = momentum
        self.buffer: Params = {}

    def step(
        self, params: Mapping[str, torch.Tensor], pseudo_grad: Mapping[str, torch.Tensor]
    ) -> Params:
        """One Nesterov step; the first step seeds the buffer with g, like torch SGD."""
        new_params: Params = {}
        new_buffer: Params = {}
        for k in sorted(params):
            g = pseudo_grad[k]
            prev = self.buffer.get(k)
            buf = g.clone() if prev is None else prev * self.momentum + g
            new_buffer[k] = buf
            new_params[k] = params[k] - self.lr * (g + self.momentum * buf)
        self.buffer = new_buffer
        return new_params

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and the momentum buffer (tensors cloned)."""
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "buffer": {k: v.clone() for k, v in self.buffer.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore hyperparameters and buffer."""
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self.buffer = {k: v.clone().float() for k, v in state["buffer"].items()}


OUTER_OPTIMIZERS: dict[str, Callable[..., OuterOptimizer]] = {
    "average": AverageOuter,
    "nesterov": NesterovOuter,
}


def make_outer(name: str, **hyperparameters: float) -> OuterOptimizer:
    """Build an outer optimizer by registry name."""
    if name not in OUTER_OPTIMIZERS:
        raise KeyError(f"unknown outer optimizer {name!r}; known: {sorted(OUTER_OPTIMIZERS)}")
    return OUTER_OPTIMIZERS[name](**hyperparameters)
