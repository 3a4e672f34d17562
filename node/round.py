"""One DiLoCo round (docs/design.md, "The round"), the same code for the simulator and the daemon.

1. start from the group's theta^{t-1}; 2. H inner AdamW steps; 3. Delta_i = theta^{t-1} - theta_i;
4. token-weighted aggregate of the members' Delta_i, verified against their claims;
5. outer step. Outer optimizers that act inside the inner loop (GHBM's local correction, the
per-peer LocalGHBM/FedHBM momentum) get a hook after every inner step.

`conclude_round` is steps 4-5 once the transport has answered: the daemon's transport is a
hivemind all-reduce, the simulator's is an in-process weighted mean; everything after that is
this one function. A member whose averaging failed ("no-group") or whose group's result did not
verify ("rejected") applies its own Delta; the report says which, and the digest consensus at
the next round start resyncs whoever diverged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aggregation.ghbm import PeerMomentum
from aggregation.outer import OuterOptimizer, RoundContext, make_outer
from aggregation.params import Params, pseudo_gradient
from aggregation.verify import checksum_problem, projection_checksum
from node.config import RunConfig
from node.state import GroupState
from node.trainer import InnerResult, InnerTrainer
from node.transport import AveragingFailed, GroupResult, MemberMeta, Transport

log = logging.getLogger("swarmtune.round")
Outcome = Literal["averaged", "no-group", "rejected"]


@dataclass(frozen=True)
class RoundReport:
    """What one round did, for progress output, metrics and tests."""

    round: int
    loss_first: float
    loss_mean: float
    loss_last: float
    tokens: int
    group_size: int
    outcome: Outcome
    digest: str
    bytes_sent: int
    bytes_received: int
    inner_s: float
    matchmaking_s: float
    allreduce_s: float
    outer_s: float
    problem: str = ""  # why the round was not averaged
    members: tuple[str, ...] = ()
    checkpoint_s: float = 0.0
    wall_s: float = 0.0
    eval_loss: float | None = None
    tau: int | None = None
    resynced: bool = False  # this peer adopted another state before the round
    fallbacks: int = 0  # running totals of this peer: no-group rounds,
    rejections: int = 0  # rejected group results,
    resyncs: int = 0  # and states adopted from others

    @property
    def verified(self) -> bool:
        """True when the group's verified average was applied."""
        return self.outcome == "averaged"


def verify_group(result: GroupResult, mine: MemberMeta) -> str | None:
    """None if `result` is the weighted mean of what its members claimed; otherwise why not."""
    members = result.members
    if result.malformed:
        return f"{len(result.malformed)} member(s) sent malformed metadata"
    if len(members) < 2 or mine.peer not in {m.peer for m in members}:
        return f"group of {len(members)} without this peer"
    starts = {(m.round, m.start_digest) for m in members}
    if len(starts) > 1:
        return f"members started from {len(starts)} different states"
    return checksum_problem(
        result.averaged,
        [m.weight for m in members],
        [m.checksum for m in members],
        seed=mine.round,
        offset=result.wire_offset,
    )


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
    if observe is not None:  # e.g. the cluster bench's task signatures
        observe(state.params, final)
    if momentum is not None:
        momentum.end_round(final, state.round)
    delta = pseudo_gradient(state.params, final)
    checksum = projection_checksum(delta, seed=state.round)
    meta = MemberMeta(peer, state.round, start.digest, float(inner.tokens), checksum, known)
    return LocalUpdate(delta, meta, inner)


def outer_phase(
    state: GroupState, aggregate: Params, context: RoundContext, config: RunConfig
) -> tuple[GroupState, int | None]:
    """Step 5: theta^t from the agreed aggregate; returns the new state and the GHBM tau used."""
    outer = load_outer(state, config)
    tau = getattr(outer, "tau", None)
    new_params = outer.step(state.params, aggregate, context)
    return GroupState(state.round + 1, new_params, outer.state_dict()), tau


def group_context(group: GroupResult | None, verified: bool) -> RoundContext:
    """Participation as the group agreed it: members, and the most peers any member knew of."""
    if group is None or not verified:
        return RoundContext(1, 1)
    population = max((m.known for m in group.members), default=1)
    return RoundContext(len(group.members), max(population, len(group.members)))


def conclude_round(
    state: GroupState,
    update: LocalUpdate,
    answer: GroupResult | AveragingFailed,
    config: RunConfig,
) -> tuple[GroupState, RoundReport]:
    """Steps 4-5 after the transport answered: verify, pick the aggregate, outer step, report."""
    mine = update.meta
    group = answer if isinstance(answer, GroupResult) else None
    if group is None:
        outcome: Outcome = "no-group"
        problem = str(answer)
        log.warning("round %d: no group (%s); applying the local update", mine.round + 1, problem)
    else:
        found = verify_group(group, mine)
        outcome, problem = ("averaged", "") if found is None else ("rejected", found)
        if found is not None:
            log.warning("round %d: rejecting the group average: %s", mine.round + 1, found)
    averaged = outcome == "averaged" and group is not None
    aggregate = group.averaged if averaged and group is not None else update.delta
    started = time.perf_counter()
    new_state, tau = outer_phase(state, aggregate, group_context(group, averaged), config)
    inner = update.inner
    report = RoundReport(
        round=state.round,
        loss_first=inner.loss_first,
        loss_mean=inner.loss_mean,
        loss_last=inner.loss_last,
        tokens=inner.tokens,
        group_size=len(group.members) if averaged and group is not None else 1,
        outcome=outcome,
        problem=problem,
        members=tuple(m.peer for m in group.members) if group is not None else (),
        digest=new_state.digest(),
        bytes_sent=group.bytes_sent if group else 0,
        bytes_received=group.bytes_received if group else 0,
        inner_s=inner.seconds,
        matchmaking_s=group.matchmaking_s if group else 0.0,
        allreduce_s=group.allreduce_s if group else 0.0,
        outer_s=time.perf_counter() - started,
        tau=tau,
    )
    return new_state, report


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
    answer: GroupResult | AveragingFailed
    try:
        answer = transport.all_reduce(update.delta, update.meta)
    except AveragingFailed as exc:
        answer = exc
    new_state, report = conclude_round(state, update, answer, config)
    trainer.set_params(new_state.params)
    return new_state, report
