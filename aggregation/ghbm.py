"""Generalized heavy-ball momentum (GHBM) and its stateful-peer variants (docs/design.md, 5).

Zaccone, Karimireddy, Masone, Ciccone, "Communication-Efficient Heterogeneous Federated Learning
with Generalized Heavy-Ball Momentum", TMLR 2025 (arXiv 2311.18578).

GHBM keeps a ring of global states and uses m^{t-1} = (theta^{t-tau-1} - theta^{t-1}) / tau.
- form "local" (the paper's): after each of the H inner steps, theta_i -= (beta/H) m^{t-1}; the
  outer step is then theta^t = theta^{t-1} - lr * Delta. Over H steps with zero gradients this
  adds exactly (beta/tau)(theta^{t-1} - theta^{t-tau-1}).
- form "server": theta^t = theta^{t-1} - lr*Delta + (beta/tau)(theta^{t-1} - theta^{t-tau-1}).
  With tau = 1 this is classical heavy ball, i.e. torch SGD(momentum=beta), exactly.
States before round 0 count as theta^0 (the ring is padded with its oldest entry), so the first
tau rounds use a partial momentum instead of none.

LocalGHBM and FedHBM keep per-peer state instead (PeerMomentum, never shared with the group):
- LocalGHBM: anchor = the global state this peer received at its previous participation;
  m_i = (anchor - theta^{t-1}) / tau, applied per inner step like GHBM.
- FedHBM: anchor = this peer's own final local state of its previous participation;
  m_i = (anchor - theta_i) / tau recomputed at every inner step from the current iterate.
tau fixed should be the paper's 1/C; tau "auto" (the default for both, node/config.py) uses the
rounds since this peer last took part, 1/C in expectation (at least 1: a round retried after it
was abandoned has its anchor 0 rounds back). The first participation has no anchor and
therefore no momentum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from swarmtune.aggregation.outer import RoundContext, Tensors, _copy
from swarmtune.aggregation.params import Params

AUTO_EMA = 0.5  # weight of the newest round in the participation estimate


def heavy_ball_term(newest: Tensors, oldest: Tensors, tau: int) -> Params:
    """m = (oldest - newest) / tau: minus the mean displacement per round over the window."""
    return {k: (oldest[k] - newest[k]) / tau for k in sorted(newest)}


def tau_from_participation(rate: float, tau_max: int) -> int:
    """tau ~ 1/C (the paper's best choice), clipped to [1, tau_max]."""
    if not rate > 0:
        return tau_max
    return max(1, min(tau_max, round(1.0 / rate)))


class GHBMOuter:
    """GHBM for one group; the ring of past global states is part of the group state."""

    def __init__(
        self,
        lr: float = 1.0,
        beta: float = 0.9,
        tau: int | Literal["auto"] = 1,
        tau_max: int = 20,
        form: Literal["local", "server"] = "local",
    ) -> None:
        self._configure(lr, beta, tau, tau_max, form)
        self.participation = 1.0  # EMA of participants / population, for tau = auto
        self.history: list[Params] = []  # oldest first, at most tau_max + 1 entries

    def _configure(self, lr: float, beta: float, tau: int | str, tau_max: int, form: str) -> None:
        if form not in ("local", "server"):
            raise ValueError(f"GHBM form must be 'local' or 'server', got {form!r}")
        if tau != "auto" and int(tau) < 1:
            raise ValueError(f"GHBM tau must be >= 1 or 'auto', got {tau!r}")
        self.lr, self.beta, self.form = lr, beta, form
        self.auto = tau == "auto"
        self.tau_max = tau_max if self.auto else int(tau)
        self.fixed_tau = None if self.auto else int(tau)

    @property
    def tau(self) -> int:
        """The tau this round uses (fixed, or estimated from past participation)."""
        if self.fixed_tau is not None:
            return self.fixed_tau
        return tau_from_participation(self.participation, self.tau_max)

    def momentum(self, params: Tensors) -> Params:
        """m^{t-1} for a group whose current state is `params` (= theta^{t-1})."""
        tau = self.tau
        oldest = self.history[max(len(self.history) - 1 - tau, 0)] if self.history else params
        return heavy_ball_term(params, oldest, tau)

    def inner_correction(self, params: Tensors, inner_steps: int) -> Params | None:
        """Per-inner-step displacement to subtract: (beta/H) m^{t-1} (local form only)."""
        if self.form != "local" or self.beta == 0:
            return None
        return {k: self.beta / inner_steps * v for k, v in self.momentum(params).items()}

    def step(self, params: Tensors, pseudo_grad: Tensors, context: RoundContext) -> Params:
        """theta^t; then the ring gains theta^t and the participation estimate is updated."""
        new = {k: params[k] - self.lr * pseudo_grad[k] for k in sorted(params)}
        if self.form == "server" and self.beta != 0:
            m = self.momentum(params)
            new = {k: new[k] - self.beta * m[k] for k in new}
        if not self.history:
            self.history = [_copy(params)]
        self.history = [*self.history, _copy(new)][-(self.tau_max + 1) :]
        if self.auto:
            rate = context.participants / max(context.population, context.participants, 1)
            self.participation = (1 - AUTO_EMA) * self.participation + AUTO_EMA * rate
        return new

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, participation estimate and the ring (oldest first)."""
        return {
            "lr": self.lr,
            "beta": self.beta,
            "form": self.form,
            "tau": "auto" if self.auto else self.fixed_tau,
            "tau_max": self.tau_max,
            "participation": self.participation,
            "tau_next": self.tau,
            "history": {str(i): _copy(p) for i, p in enumerate(self.history)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore everything state_dict wrote."""
        self._configure(
            float(state["lr"]),
            float(state["beta"]),
            state["tau"],
            int(state["tau_max"]),
            str(state["form"]),
        )
        self.participation = float(state["participation"])
        ring = state.get("history", {})
        if len(ring) > self.tau_max + 1:
            raise ValueError(f"a ring of {len(ring)} states, over tau_max + 1 = {self.tau_max + 1}")
        self.history = [_copy(ring[str(i)]) for i in range(len(ring))]


class PeerMomentum:
    """LocalGHBM (anchor = last received global state) or FedHBM (anchor = last local result)."""

    def __init__(
        self, kind: Literal["local-ghbm", "fedhbm"], beta: float, tau: int | Literal["auto"]
    ) -> None:
        if kind not in ("local-ghbm", "fedhbm"):
            raise ValueError(f"unknown peer momentum {kind!r}")
        if tau != "auto" and int(tau) < 1:
            raise ValueError(f"peer momentum tau must be >= 1 or 'auto', got {tau!r}")
        self.kind, self.beta, self.tau_setting = kind, beta, tau
        self.anchor: Params = {}
        self.anchor_round = -1
        self._tau = 1.0
        self._fixed: Params | None = None

    def begin_round(self, global_params: Tensors, round_: int) -> None:
        """Called with theta^{t-1} before the inner loop; prepares this round's momentum."""
        gap = self.rounds_since_anchor(round_)
        self._tau = float(gap if self.tau_setting == "auto" else self.tau_setting)
        self._fixed = None
        if self.anchor and self.kind == "local-ghbm":
            self._fixed = heavy_ball_term(global_params, self.anchor, 1)
        if self.kind == "local-ghbm":
            self._start(global_params, round_)

    def rounds_since_anchor(self, round_: int) -> int:
        """round_ - anchor_round, at least 1 (the tau "auto" uses).

        An abandoned round followed by a sync to the same round re-runs a round whose anchor was
        already taken (gap 0), and a resync to an older state can leave the anchor ahead (gap < 0).
        The anchor is then at most one round's displacement away, so it counts as 1 round.
        """
        return max(1, round_ - self.anchor_round)

    def _start(self, params: Tensors, round_: int) -> None:
        self.anchor, self.anchor_round = _copy(params), round_

    @property
    def uses_iterate(self) -> bool:
        """FedHBM's correction depends on the current inner iterate; LocalGHBM's is fixed."""
        return self.kind == "fedhbm"

    def correction(self, current: Tensors, inner_steps: int) -> Params | None:
        """Displacement to subtract after an inner step: (beta / (H tau)) (anchor - x)."""
        scale = self.beta / (inner_steps * self._tau)
        if self.kind == "local-ghbm":
            fixed = self._fixed
            return None if fixed is None else {k: scale * v for k, v in fixed.items()}
        if not self.anchor or not math.isfinite(scale):
            return None
        return {k: scale * (self.anchor[k] - current[k]) for k in sorted(current)}

    def end_round(self, local_params: Tensors, round_: int) -> None:
        """Called with this peer's final inner iterate (FedHBM keeps it as the next anchor)."""
        if self.kind == "fedhbm":
            self._start(local_params, round_)

    def state_dict(self) -> dict[str, Any]:
        """Anchor and its round (per-peer; goes to the peer's local checkpoint)."""
        return {"kind": self.kind, "anchor_round": self.anchor_round, "anchor": _copy(self.anchor)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the anchor; a missing or empty anchor loads as none (anchor_round -1).

        Any anchor_round is accepted, including this round's (saved after an abandoned round):
        begin_round counts such an anchor as 1 round old.
        """
        if state.get("kind") != self.kind:
            raise ValueError(f"peer momentum state is for {state.get('kind')!r}, not {self.kind!r}")
        self.anchor = _copy(state.get("anchor") or {})
        self.anchor_round = int(state.get("anchor_round", -1)) if self.anchor else -1
        self._tau, self._fixed = 1.0, None
