"""Aggregation rules that bound any single member's pull on a group update.

Norm bound (`bound_norms`, applied first): every contribution longer than `factor` times the
weighted median of the contributions' L2 norms (nu) is scaled down to that length. A member
with weight share p then moves the weighted mean by at most p * factor * nu, and replacing it
by any other member moves the mean by at most 2 p factor nu. The median is decided by the
members holding more than half the weight, so attackers below half cannot inflate nu.
Honest pseudo-gradients of one round have similar norms (AdamW normalises the inner steps), so
on a clean round the bound scales at most the longer half of them by a few percent.

CenteredClip (Karimireddy, He, Jaggi, ICML 2021; used by BTARD, Gorbunov et al. 2022,
arXiv 2106.11257): starting from v_0, iterate

    v <- v + sum_i w_i * clip_tau(x_i - v) / sum_i w_i,   clip_tau(d) = d * min(1, tau / |d|)

Each step moves v by at most tau * (the member's share of the weight) per member, so a member
with weight share p can move the result by at most p * tau per iteration, whatever it sends.
With tau = infinity one iteration from any start gives the weighted mean.

The start v_0 is the coordinate-wise weighted median of the contributions: it is itself
robust (fewer than half of the weight cannot move it outside the honest values' range), so
the clipping radius is measured around an honest point, not around a poisoned mean.

tau is chosen from the data: a multiple of the weighted median distance of the contributions
to v_0 (`clip_scale`). Honest pseudo-gradients of one round scatter around their mean at a common
scale, so the median distance tracks that scale and needs no tuning per learning rate.

How far an attacker can pull (`influence_bound`): let m be the honest members' weighted mean,
R their largest distance to it, q their weight share and p = 1 - q the attacker's. One step
gives v' - m = (1 - q')(v - m) + sum_h (w_h l_h / W)(x_h - m) + p * clip(x_a - v), where
l_h in (0, 1] are the honest clip factors and q' = sum_h w_h l_h / W <= q. Hence
|v' - m| <= |v - m| + q R + p tau, and after T iterations

    |v_T - m| <= |v_0 - m| + T (q R + p tau).

The attacker's own term is at most p tau per step, and it cannot inflate tau: tau comes from
the weighted median distance, which honest members decide while they hold more than half the
weight. It can shift v_0 only within the honest values' range per coordinate.

Ties and breakdown: a coalition holding less than half the weight cannot move any weighted
median (of norms, of coordinates, of distances) outside the honest values. At exactly half it
can, and the old rule let it: three of six members sending zeros made the median norm 0 (every
update scaled to nothing), and three identical contributions could make the median distance 0
(tau = 0, the result their coordinate median). So:
- contributions of norm 0 are dropped before anything is computed (`without_empty`);
- the coordinate median and the median distance take the midpoint of the two middle values at
  an exact half-weight tie, which neither half decides alone;
- the median norm keeps the lower value at a tie: the midpoint would let a coalition of long
  updates raise the limit (measured: +963% eval loss at 3 of 6 sign flips in the simulator),
  while the lower value lets a coalition of tiny updates only stall a round, never reverse it;
- tau is at least TAU_FLOOR times the median norm, so identical contributions cannot shrink
  the clipping radius to nothing.
None of this defends half the weight. Below half, an attacker inside the honest spread keeps
p * tau per iteration, and tau is about twice the honest spread, which for LoRA
pseudo-gradients is larger than their mean: that, not 1/2, is the practical breakdown
(docs/design.md section 8 gives the measured point).

Determinism: every member must compute bit-identical results. Elementwise float64 arithmetic
is; reductions (norms) may not be across thread counts or CPUs, so norms are rounded to 30
significant bits before they steer anything. Two members then disagree only if a norm falls
within 2^-30 (relative) of a rounding boundary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from swarmtune.aggregation.params import Params

Tensors = Mapping[str, torch.Tensor]
NORM_BITS = 30
TAU_FLOOR = 0.25  # tau is at least this fraction of the weighted median norm ("Ties")


def stable_norm(value: float) -> float:
    """`value` rounded to NORM_BITS significant bits (see the module docstring)."""
    if value == 0.0 or not math.isfinite(value):
        return value
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * (1 << NORM_BITS)) / (1 << NORM_BITS), exponent)


def _distance(a: Tensors, b: Tensors) -> float:
    total = 0.0
    for k in sorted(a):
        total += float((a[k].double() - b[k].double()).pow(2).sum())
    return stable_norm(math.sqrt(total))


def weighted_median(contributions: Sequence[Tensors], weights: Sequence[float]) -> Params:
    """Coordinate-wise weighted median, float64; where the values below hold exactly half the
    weight, the midpoint of the two middle values (module docstring, "Ties")."""
    total = sum(weights)
    out: Params = {}
    w = torch.tensor(list(weights), dtype=torch.float64)
    last = len(contributions) - 1
    for k in sorted(contributions[0]):
        stacked = torch.stack([c[k].double().flatten() for c in contributions])
        values, order = stacked.sort(dim=0, stable=True)
        cumulative = w[order].cumsum(dim=0)
        index = (cumulative < total / 2).sum(dim=0, keepdim=True)
        lower = values.gather(0, index)
        upper = values.gather(0, (index + 1).clamp(max=last))
        tie = cumulative.gather(0, index) == total / 2
        out[k] = torch.where(tie, (lower + upper) / 2, lower).reshape(contributions[0][k].shape)
    return out


def median_of(values: Sequence[float], weights: Sequence[float], tie: str = "midpoint") -> float:
    """Weighted median of scalars; at an exact half-weight tie the midpoint of the two middle
    values, or with tie="lower" the lower one."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    total, running = sum(weights), 0.0
    for position, i in enumerate(order):
        running += weights[i]
        if running >= total / 2:
            if tie == "midpoint" and running == total / 2 and position + 1 < len(order):
                return stable_norm((values[i] + values[order[position + 1]]) / 2)
            return values[i]
    raise ValueError("need at least one value")


def without_empty(
    contributions: Sequence[Tensors], weights: Sequence[float]
) -> tuple[list[Tensors], list[float]]:
    """The contributions whose norm is not zero, with their weights (all of them if none is):
    a zero update carries no direction, and counted it only dilutes, or hands a coalition of
    zeros the median."""
    kept = [i for i, c in enumerate(contributions) if norm_of(c) > 0.0]
    if not kept:
        return list(contributions), list(weights)
    return [contributions[i] for i in kept], [weights[i] for i in kept]


def norm_of(x: Tensors) -> float:
    """L2 norm over all tensors, float64, rounded to NORM_BITS."""
    return stable_norm(math.sqrt(sum(float(x[k].double().pow(2).sum()) for k in sorted(x))))


def bound_norms(
    contributions: Sequence[Tensors], weights: Sequence[float], factor: float = 1.0
) -> tuple[list[Params], float]:
    """Each contribution scaled down to at most `factor` x the weighted median norm; returns
    the bounded contributions (float64) and that limit."""
    norms = [norm_of(c) for c in contributions]
    limit = stable_norm(factor * median_of(norms, weights, tie="lower"))
    bounded = []
    for contribution, norm in zip(contributions, norms, strict=True):
        scale = 1.0 if norm <= limit or norm == 0.0 else limit / norm
        bounded.append({k: contribution[k].double() * scale for k in sorted(contribution)})
    return bounded, limit


def centered_clip(
    contributions: Sequence[Tensors],
    weights: Sequence[float],
    clip_scale: float = 2.0,
    iterations: int = 3,
) -> tuple[Params, float]:
    """CenteredClip from the weighted median with tau = clip_scale * median distance to it;
    returns the aggregate (float32) and tau."""
    if len(contributions) != len(weights) or not contributions:
        raise ValueError("need one weight per contribution, and at least one")
    if any(not w > 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    total = float(sum(weights))
    center = weighted_median(contributions, weights)
    distances = [_distance(c, center) for c in contributions]
    floor = TAU_FLOOR * median_of([norm_of(c) for c in contributions], weights, tie="lower")
    tau = stable_norm(max(clip_scale * median_of(distances, weights), floor))
    for _ in range(iterations):
        step = {k: torch.zeros_like(v) for k, v in center.items()}
        for contribution, w in zip(contributions, weights, strict=True):
            distance = _distance(contribution, center)
            factor = 1.0 if distance <= tau else tau / distance
            for k in step:
                step[k] += (w / total * factor) * (contribution[k].double() - center[k])
        center = {k: center[k] + step[k] for k in center}
    return {k: v.float() for k, v in center.items()}, tau


def influence_bound(
    contributions: Sequence[Tensors],
    weights: Sequence[float],
    reference: Tensors,
    radius: float,
    share: float,
    tau: float,
    iterations: int,
) -> float:
    """|v_0 - m| + T (q R + p tau) (module docstring): how far `centered_clip` of these
    contributions can end from the honest mean `reference`, given the honest radius R, the
    attackers' weight share p = `share` and the round's tau."""
    start = _distance(weighted_median(contributions, weights), reference)
    return start + iterations * ((1 - share) * radius + share * tau)
