"""Hostile contributions, for tests and bench/attacks.py (docs/design.md, 8. Trust).

Each adversary turns what a hostile member knows (its own honest pseudo-gradient, and for the
omniscient attacks the honest members' ones) into what it sends: a delta, a claimed weight,
and for the protocol-level attacks a flag that tests/attackers/averager.py acts on. They are written
from the papers' definitions:

- weight inflation: claims weight 1e9 (and sends -20x its delta) to own the weighted mean;
- scaled sign flip: -10x its honest delta, honest weight;
- Gaussian noise: its delta plus noise 50x its norm;
- ALIE, "A little is enough" (Baruch et al., NeurIPS 2019): mean - z * std of the honest
  deltas per coordinate, small enough per coordinate to pass as honest;
- IPM, inner-product manipulation (Xie et al., UAI 2020): -eps * mean of the honest deltas,
  so that the aggregate's inner product with the true direction turns negative;
- equivocation, our counterpart of a lying reducer (no member reduces anyone else's part in
  swarmtune's all-gather): commits to one blob and serves another;
- malformed metadata: gathered metadata that does not parse;
- unadmitted: no admission ticket (token runs);
- withholding: commits to its honest blob in matchmaking and never serves it;
- zeros: an identity that trains nothing and sends a zero update at honest weight (free to
  run many of; at half the weight it used to set the median norm to 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarmtune.aggregation.params import Params


@dataclass(frozen=True)
class Forgery:
    """What a hostile member sends instead of its honest contribution."""

    delta: Params
    weight: float
    equivocate: bool = False  # serve bytes other than the ones committed to
    malformed: bool = False  # gathered metadata that does not parse
    ticket: bool = True  # present the member's admission ticket
    withhold: bool = False  # commit in matchmaking, then serve nothing


def _scale(delta: Params, factor: float) -> Params:
    return {k: v * factor for k, v in delta.items()}


def _norm(delta: Params) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))


def _mean_std(honest: Sequence[Params]) -> tuple[Params, Params]:
    stacked = {k: torch.stack([h[k] for h in honest]) for k in honest[0]}
    mean = {k: v.mean(0) for k, v in stacked.items()}
    std = {k: v.std(0, unbiased=False) for k, v in stacked.items()}
    return mean, std


class Adversary:
    """Base: sends its honest contribution. Subclasses override `forge`."""

    name = "honest"
    omniscient = False  # needs the honest members' deltas of the round

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        """The contribution to send, from the member's own delta and weight."""
        return Forgery(own, weight)


class WeightInflation(Adversary):
    name = "weight-inflation"

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        return Forgery(_scale(own, -20.0), 1e9)


class WeightDeflation(Adversary):
    """Claims a weight near zero: under step weights a contribution is rescaled by the median
    step count over its own (aggregation/steps.py), so an unchecked claim of 1e-300 steps turned
    every member's aggregate into NaN (found in review); the round now refuses any claim that is
    not a whole number of steps, as an offence."""

    name = "weight-deflation"

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        return Forgery(_scale(own, -20.0), 1e-300)


class SignFlip(Adversary):
    """-10x its honest delta at its honest weight; the protocol-level attacks below send the
    same delta and differ only in how they lie about it."""

    name = "sign-flip"
    lie: dict[str, bool] = {}

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        return Forgery(_scale(own, -10.0), weight, **self.lie)


class GaussianNoise(Adversary):
    name = "noise-50x"

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        noise = {k: torch.randn(v.shape, generator=gen) for k, v in own.items()}
        factor = 50.0 * _norm(own) / max(_norm(noise), 1e-30)
        return Forgery({k: own[k] + factor * noise[k] for k in own}, weight)


class ALIE(Adversary):
    """z = 1: the paper's z_max for our groups is 0 (n = 4, f = 1: s = n/2 + 1 - f = 2,
    Phi^-1((n - s)/n) = 0, which sends the honest mean) and 0.32 (n = 8, f = 2); z = 1, as
    in later evaluations, is the stronger attack."""

    name = "alie"
    omniscient = True

    def __init__(self, z: float = 1.0) -> None:
        self.z = z

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        mean, std = _mean_std(honest or [own])
        return Forgery({k: mean[k] - self.z * std[k] for k in mean}, weight)


class IPM(Adversary):
    """eps = 4: with f = 1 of n = 4, the plain mean becomes (3 - 4)/4 of the honest mean, an
    ascent step; Xie et al.'s small eps (0.1-0.5) targets median-like rules instead."""

    name = "ipm"
    omniscient = True

    def __init__(self, eps: float = 4.0) -> None:
        self.eps = eps

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        mean, _ = _mean_std(honest or [own])
        return Forgery(_scale(mean, -self.eps), weight)


class Equivocation(SignFlip):
    """Commits to its honest blob, serves the flipped one: fetchers see bytes that do not match
    the commitment."""

    name = "equivocation"
    lie = {"equivocate": True}


class MalformedMetadata(SignFlip):
    name = "malformed-metadata"
    lie = {"malformed": True}


class Unadmitted(SignFlip):
    """No ticket: harmful wherever it is let in."""

    name = "unadmitted"
    lie = {"ticket": False}


class Withholding(SignFlip):
    name = "withholding"
    lie = {"withhold": True}


class Zeros(Adversary):
    name = "zeros"

    def forge(
        self, own: Params, honest: Sequence[Params], weight: float, gen: torch.Generator
    ) -> Forgery:
        return Forgery({k: torch.zeros_like(v) for k, v in own.items()}, weight)


ADVERSARIES: dict[str, type[Adversary]] = {
    cls.name: cls
    for cls in (
        WeightInflation,
        WeightDeflation,
        SignFlip,
        GaussianNoise,
        ALIE,
        IPM,
        Equivocation,
        MalformedMetadata,
        Unadmitted,
        Withholding,
        Zeros,
    )
}
