"""Contributions trained for different numbers of inner steps (a round with a deadline).

A member stopped by the round's deadline after tau_i of H steps sends a Delta_i that is about
tau_i / H of a full round's. Averaged as they come, weighed by their steps, a member at a
quarter of the others' speed counts about (1/4)^2 = 1/16 of a fast one: the aggregate drifts
towards the fast members' data, and a norm bound keyed to the median norm treats its short
Delta_i as a short one, not as a slow one.

FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020, arXiv 2007.07481) normalises instead.
With plain local steps its update is

    tau_eff * sum_i p_i * Delta_i / tau_i,     tau_eff = sum_i p_i * tau_i,

each member's per-step progress, weighed by its share p_i of the data, scaled back up to the
members' average number of steps. Here every member has the same share (p_i = 1 / n: DiLoCo's
plain mean, `averaging.weight: steps`), so `normalize_steps` rescales each Delta_i to
tau_eff / tau_i of itself and gives every member the same weight. One change: tau_eff is the
median of the step counts, not their mean, because the counts are the members' own claims:
with the mean, identities that claim one step each would shrink every honest Delta; the median
is decided by the members holding more than half of the group, like every other median of
aggregation/robust.py. For an even count it is the upper middle claim: claims are at most H,
so at an exact half-half tie a coalition can at most scale the other half's shorter Deltas up
to H steps' worth (which the norm bound then limits), never shrink a full member's. The robust
rules
(aggregation/robust.py) then see contributions of one scale, so a slow honest member is neither
clipped for being short nor outvoted for being slow. With AdamW inner steps a Delta_i grows
about linearly with the steps taken (each step moves every coordinate by up to lr), which is
what the rescaling assumes.

`inner.deadline_s: auto` sets the deadline from the group instead of by hand: each member
tells its group how many seconds its inner steps took per step (`step_s`), and the next round's
deadline is H times the median of those (`agreed_deadline`; the upper middle one for an even
count). With one member at a quarter of the others' speed among four, the median is a fast
member's: the fast ones train their H steps in about the deadline and the slow one stops there,
short of H. The times are claims too; the upper median keeps a minority from moving the
deadline outside the range of the honest members' times, and at an exact half-half tie it errs
towards the longer deadline, that is towards plain H-step rounds.

When every member trained the same number of steps every factor is exactly 1 and the
contributions are returned as they are: rounds without a deadline are bit-identical to the
plain weighted mean.

A member's step count is its own claim, checked by the round (node/engine/round.py): a whole
number from 1 to H, anything else an offence. One that claims a single step has its Delta_i
scaled up at most H-fold, which the norm bound (`averaging.norm_bound`, on by default) then
cuts to the median norm, the same length any other member may send; under the plain mean
without a norm bound nothing cuts it, as nothing cuts a long Delta there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from swarmtune.aggregation.robust import Tensors


def normalize_steps(
    contributions: Sequence[Tensors], steps: Sequence[float]
) -> tuple[list[Tensors], list[float]]:
    """(each Delta_i rescaled by tau_eff / tau_i, equal weights), tau_eff the median of `steps`
    (the upper middle value for an even count: one of the claims, exactly)."""
    if len(contributions) != len(steps):
        raise ValueError(f"{len(contributions)} contributions, {len(steps)} step counts")
    if any(not tau >= 1 for tau in steps):
        raise ValueError(f"step counts must be at least 1: {list(steps)}")
    if not contributions:
        return [], []
    tau_eff = float(sorted(steps)[len(steps) // 2])
    scaled: list[Tensors] = []
    for delta, tau in zip(contributions, steps, strict=True):
        factor = tau_eff / float(tau)
        if factor == 1.0:
            scaled.append(delta)
        else:
            scaled.append({k: (v.double() * factor).to(v.dtype) for k, v in delta.items()})
    return scaled, [tau_eff] * len(steps)


DEADLINE_MAX_S = 86_400.0  # the longest deadline a run config may set, and auto may agree


def agreed_deadline(step_seconds: Sequence[float], steps: int) -> float | None:
    """The next round's deadline under `inner.deadline_s: auto`: `steps` times the median of the
    members' seconds per inner step (the upper middle value for an even count), at most
    DEADLINE_MAX_S; values that are not positive and finite (a member that did not say) are
    left out; None when none is left."""
    known = sorted(s for s in step_seconds if math.isfinite(s) and s > 0)
    if not known:
        return None
    return min(steps * known[len(known) // 2], DEADLINE_MAX_S)
