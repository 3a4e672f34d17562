"""One DiLoCo round (DESIGN.md 3.1), the same code for the simulator and the daemon.

1. start from the group's theta^{t-1}; 2. H inner AdamW steps; 3. Delta_i = theta^{t-1} - theta_i;
4. token-weighted all-reduce, verified by a linear checksum and the members' start digests;
5. outer step. In gossip mode (averaging.gossip) a peer instead averages its end point with one
random partner (group of 2) and applies the outer step to Delta = theta^{t-1} - mean end point.
Outer optimizers that act inside the inner loop (GHBM's local correction, the
per-peer LocalGHBM/FedHBM momentum) get a hook after every inner step. A member alone, or whose all-reduce fails verification, applies its own Delta;
the digest consensus at the next round start then resyncs whoever diverged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from aggregation.ghbm import PeerMomentum
from aggregation.outer import OuterOptimizer, RoundContext, make_outer
from aggregation.params import Params, projection_checksum, pseudo_gradient, round_like_codec
from node.config import RunConfig
from node.state import GroupState
from node.trainer import InnerResult, InnerTrainer
from node.transport import AveragingFailed, GroupResult, MemberMeta, Transport

log = logging.getLogger("swarmtune.round")


@dataclass(frozen=True)
class RoundReport:
    """What one round did, for progress output, metrics and tests."""

    round: int
    loss_first: float
    loss_mean: float
    loss_last: float
    tokens: int
    group_size: int
    verified: bool
    digest: str
    bytes_sent: int
    bytes_received: int
    inner_s: float
    matchmaking_s: float
    allreduce_s: float
    outer_s: float
    members: tuple[str, ...] = ()
    checkpoint_s: float = 0.0
    wall_s: float = 0.0
    eval_loss: float | None = None
    tau: int | None = None


def verify_group(
    result: GroupResult, mine: MemberMeta, rtol: float, same_start: bool = True
) -> str | None:
    """None if the average is what the members' checksums predict; otherwise why not.

    Group rounds also require every member to have started from the same state; gossip
    partners (same_start=False) hold different states by design and only share the round.
    """
    members = result.members
    if len(members) < 2 or mine.peer not in {m.peer for m in members}:
        return f"group of {len(members)} without this peer"
    starts = Counter((m.round, m.start_digest if same_start else "") for m in members)
    if len(starts) > 1:
        return f"members started from {len(starts)} different states"
    total = sum(m.weight for m in members)
    if total <= 0:
        return "non-positive total weight"
    expected = sum(m.weight * m.checksum for m in members) / total
    actual = projection_checksum(result.averaged, seed=mine.round)
    scale = sum(m.weight * abs(m.checksum) for m in members) / total + 1e-12
    if abs(actual - expected) > rtol * scale:
        return f"checksum mismatch ({actual:.6g} != {expected:.6g})"
    return None


def average(
    transport: Transport, delta: Params, mine: MemberMeta, rtol: float, same_start: bool = True
) -> tuple[Params, GroupResult | None, bool]:
    """(aggregate, group, verified): the group's weighted mean, or our own Delta if it failed."""
    try:
        result = transport.all_reduce(delta, mine)
    except AveragingFailed as exc:
        log.warning("round %d: averaging failed (%s); applying the local update", mine.round, exc)
        return delta, None, False
    problem = verify_group(result, mine, rtol, same_start)
    if problem is not None:
        log.warning("round %d: rejecting the group average: %s", mine.round, problem)
        return delta, result, False
    return result.averaged, result, True


@dataclass
class LocalUpdate:
    """One member's contribution to a round: its pseudo-gradient, metadata and inner stats."""

    delta: Params
    meta: MemberMeta
    inner: InnerResult


def load_outer(state: GroupState, config: RunConfig) -> OuterOptimizer:
    """The configured outer optimizer with the group's saved state."""
    outer = make_outer(config.outer.name, **config.outer.hyperparameters())
    if state.outer_state:
        outer.load_state_dict(state.outer_state)
    return outer


@dataclass(frozen=True)
class RoundStart:
    """What every member of a round derives from theta^{t-1}: its digest and the outer
    optimizer's per-inner-step correction (GHBM's local form), computed once per round."""

    digest: str
    correction: Params | None


def round_start(state: GroupState, config: RunConfig) -> RoundStart:
    """Digest and shared inner-step correction of the round starting from `state`."""
    correction = load_outer(state, config).inner_correction(state.params, config.inner.steps)
    return RoundStart(state.digest(), correction)


def _sum(a: Params | None, b: Params | None) -> Params | None:
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] for k in a}


def inner_phase(
    state: GroupState,
    start: RoundStart,
    trainer: InnerTrainer,
    peer: str,
    config: RunConfig,
    momentum: PeerMomentum | None = None,
    known: int = 1,
    observe: Callable[[Params, Params], None] | None = None,
) -> LocalUpdate:
    """Steps 1-3: H inner steps from theta^{t-1} (with any per-step momentum), then Delta_i."""
    steps = config.inner.steps
    fixed, per_iterate = start.correction, None
    if momentum is not None:
        momentum.begin_round(state.params, state.round)
        if momentum.uses_iterate:
            per_iterate = momentum
        else:
            fixed = _sum(fixed, momentum.correction(state.params, steps))

    def after_step(_: int) -> None:
        if fixed is not None:
            trainer.shift_params(fixed)
        own = per_iterate.correction(trainer.get_params(), steps) if per_iterate else None
        if own is not None:
            trainer.shift_params(own)

    trainer.set_params(state.params)
    hooked = fixed is not None or per_iterate is not None
    inner = trainer.train_steps(steps, after_step if hooked else None)
    final = trainer.get_params()
    if observe is not None:  # e.g. the simulator's task signatures
        observe(state.params, final)
    if momentum is not None:
        momentum.end_round(final, state.round)
    delta = round_like_codec(pseudo_gradient(state.params, final), config.averaging.codec)
    checksum = projection_checksum(delta, seed=state.round)
    meta = MemberMeta(peer, state.round, start.digest, float(inner.tokens), checksum, known)
    return LocalUpdate(delta, meta, inner)


def outer_phase(
    state: GroupState, aggregate: Params, context: RoundContext, config: RunConfig
) -> tuple[GroupState, int | None]:
    """Step 5: theta^t from the agreed aggregate; returns the new state and the GHBM tau used."""
    outer = load_outer(state, config)
    tau = getattr(outer, "tau", None)
    aggregate = round_like_codec(aggregate, config.averaging.codec)
    new_params = outer.step(state.params, aggregate, context)
    return GroupState(state.round + 1, new_params, outer.state_dict()), tau


def group_context(group: GroupResult | None, verified: bool) -> RoundContext:
    """Participation as the group agreed it: members, and the most peers any member knew of."""
    if group is None or not verified:
        return RoundContext(1, 1)
    population = max((m.known for m in group.members), default=1)
    return RoundContext(len(group.members), max(population, len(group.members)))


def run_round(
    state: GroupState,
    trainer: InnerTrainer,
    transport: Transport,
    config: RunConfig,
    momentum: PeerMomentum | None = None,
    known: int = 1,
) -> tuple[GroupState, RoundReport]:
    """Advance the group state by one DiLoCo round; inputs are not mutated."""
    start = round_start(state, config)
    update = inner_phase(state, start, trainer, transport.peer, config, momentum, known)
    gossip = config.averaging.gossip
    sent, meta = update.delta, update.meta
    if gossip:  # partners hold different states: average the end points, not the deltas
        sent = {k: state.params[k] - update.delta[k] for k in sorted(update.delta)}
        meta = replace(meta, checksum=projection_checksum(sent, seed=state.round))
    aggregate, group, verified = average(
        transport, sent, meta, config.averaging.verify_rtol, same_start=not gossip
    )
    if gossip:
        aggregate = pseudo_gradient(state.params, aggregate)
    started = time.perf_counter()
    new_state, tau = outer_phase(state, aggregate, group_context(group, verified), config)
    outer_s = time.perf_counter() - started
    trainer.set_params(new_state.params)
    inner = update.inner
    report = RoundReport(
        round=state.round,
        loss_first=inner.loss_first,
        loss_mean=inner.loss_mean,
        loss_last=inner.loss_last,
        tokens=inner.tokens,
        group_size=len(group.members) if verified and group else 1,
        verified=verified,
        members=tuple(m.peer for m in group.members) if group else (),
        digest=new_state.digest(),
        bytes_sent=group.bytes_sent if group else 0,
        bytes_received=group.bytes_received if group else 0,
        inner_s=inner.seconds,
        matchmaking_s=group.matchmaking_s if group else 0.0,
        allreduce_s=group.allreduce_s if group else 0.0,
        outer_s=outer_s,
        tau=tau,
    )
    return new_state, report
