"""One descriptor per outer optimizer: its name, how to build it, the hyperparameters it takes,
its defaults, and where its momentum lives. The config's validation and defaults
(node/config.py), make_outer and the per-peer momentum all read this table, so a new method is
one line here plus its class (aggregation/outer.py, aggregation/ghbm.py).

Defaults: DiLoCo's Nesterov (lr 0.7, momentum 0.9), the GHBM paper (lr 1, beta 0.9; FedHBM beta
1 as in its reference code), Reddi et al. 2021 for the adaptive ones (lr 0.01).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from swarmtune.aggregation.ghbm import GHBMOuter, PeerMomentum
from swarmtune.aggregation.outer import AdaptiveOuter, FedAvgOuter, MomentumOuter, OuterOptimizer


@dataclass(frozen=True)
class OuterMethod:
    """An outer optimizer as the run config names it.

    `params` are the keyword arguments `build` takes (the config's momentum is passed as
    `momentum` or as GHBM's `beta`); `per_peer` methods keep their momentum in each peer's inner
    loop (PeerMomentum) and average with plain FedAvg at the group step."""

    name: str
    build: Callable[..., OuterOptimizer]
    params: tuple[str, ...]
    lr: float = 1.0  # default outer lr
    momentum: float = 0.9  # default momentum / GHBM beta, where the method takes one
    per_peer: bool = False

    @property
    def heavy_ball(self) -> bool:
        """Momentum accumulated without bound (FedAvgM, Nesterov): it must stay below 1."""
        return "momentum" in self.params


_GHBM = ("lr", "beta", "tau", "tau_max")
_ADAPTIVE = ("lr", "beta1", "beta2", "eps")
OUTER_METHODS: dict[str, OuterMethod] = {
    m.name: m
    for m in (
        OuterMethod("fedavg", FedAvgOuter, ("lr",)),  # theta - lr*Delta; lr 1 averages
        OuterMethod("average", FedAvgOuter, ("lr",)),  # fedavg under another name
        OuterMethod("fedavgm", partial(MomentumOuter, nesterov=False), ("lr", "momentum")),
        OuterMethod("nesterov", partial(MomentumOuter, nesterov=True), ("lr", "momentum"), lr=0.7),
        OuterMethod("fedadam", partial(AdaptiveOuter, yogi=False), _ADAPTIVE, lr=0.01),
        OuterMethod("fedyogi", partial(AdaptiveOuter, yogi=True), _ADAPTIVE, lr=0.01),
        OuterMethod("ghbm", partial(GHBMOuter, form="local"), _GHBM),  # in the inner steps
        OuterMethod("ghbm-server", partial(GHBMOuter, form="server"), _GHBM),  # at the group step
        # per-peer GHBM, anchored at the last global state it received / its own last state
        OuterMethod("local-ghbm", FedAvgOuter, ("lr",), per_peer=True),
        OuterMethod("fedhbm", FedAvgOuter, ("lr",), momentum=1.0, per_peer=True),
    )
}


def outer_method(name: str) -> OuterMethod:
    """The descriptor of `name`; KeyError listing the known names otherwise."""
    if name not in OUTER_METHODS:
        raise KeyError(f"unknown outer optimizer {name!r}; known: {', '.join(OUTER_METHODS)}")
    return OUTER_METHODS[name]


def make_outer(name: str, **hyperparameters: Any) -> OuterOptimizer:
    """Build an outer optimizer by name, from exactly the hyperparameters it takes (a value it
    would not use is an error, not silently dropped)."""
    method = outer_method(name)
    unused = sorted(set(hyperparameters) - set(method.params))
    if unused:
        raise TypeError(f"outer optimizer {name!r} takes {method.params}, not {unused}")
    return method.build(**hyperparameters)


def make_peer_momentum(
    name: str, beta: float, tau: int | Literal["auto"] = "auto"
) -> PeerMomentum | None:
    """The per-peer state a method keeps in the inner loop, or None for group-only methods.

    tau defaults to "auto" (rounds since the last participation, ~1/C); a fixed tau should be 1/C.
    """
    if outer_method(name).per_peer:
        return PeerMomentum(name, beta, tau)  # type: ignore[arg-type]
    return None
