"""One DiLoCo round (docs/design.md, "The round"), the same code for the simulator and the daemon.

1. start from the group's theta^{t-1}; 2. H inner AdamW steps; 3. Delta_i = theta^{t-1} - theta_i;
4. the transport all-gathers the group's Delta_i; every member takes the weighted mean of
the same contributions in the same order (float64 accumulation), so all end bit-identical;
5. outer step. Outer optimizers that act inside the inner loop (GHBM's local correction, the
per-peer LocalGHBM/FedHBM momentum) get a hook after every inner step.

`conclude_round` is steps 4-5 once the transport has answered: the daemon's transport is
hivemind matchmaking plus a blob all-gather, the simulator's is in-process; everything after
that is this one function. A contribution from another round or start state, or one that did
not arrive intact, is excluded and named in the report ("excluded"). A member that found no
group ("no-group"), or whose group left it no usable contribution but its own ("rejected"),
applies its own Delta; the next round's digest consensus resyncs whoever diverged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from swarmtune.aggregation.ghbm import PeerMomentum
from swarmtune.aggregation.outer import RoundContext
from swarmtune.aggregation.params import Params, pseudo_gradient, weighted_mean
from swarmtune.aggregation.robust import Tensors, bound_norms, centered_clip, without_empty
from swarmtune.aggregation.steps import agreed_deadline, normalize_steps
from swarmtune.node.config import RunConfig, max_round_weight
from swarmtune.node.engine.outer_state import load_outer
from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.transport import AveragingFailed, GroupResult, MemberMeta
from swarmtune.node.engine.trust import banned, record_offences

if TYPE_CHECKING:  # the trainer's libraries (transformers, peft) load only where it runs
    from swarmtune.node.local.trainer import InnerResult, InnerTrainer

log = logging.getLogger("swarmtune.round")
Outcome = Literal["averaged", "no-group", "rejected", "too-small"]


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
    transfer_s: float  # fetching the other members' contributions
    outer_s: float
    problem: str = ""  # why the round was not averaged
    members: tuple[str, ...] = ()  # whose contributions were aggregated
    excluded: tuple[str, ...] = ()  # group members whose contributions were left out
    offenders: tuple[str, ...] = ()  # of those, the ones that served provably bad data
    checkpoint_s: float = 0.0
    wall_s: float = 0.0
    eval_loss: float | None = None
    eval_exact: float | None = None  # share of held-out prompts completed exactly
    tau: int | None = None
    resynced: bool = False  # this peer adopted another state before the round
    fallbacks: int = 0  # running totals of this peer: no-group rounds,
    rejections: int = 0  # groups that left it nothing to aggregate,
    exclusions: int = 0  # contributions left out,
    resyncs: int = 0  # and states adopted from others
    unproven: int = 0  # announced states refused for want of proof
    banned: int = 0  # peers the group kept out of this round (repeat offenders)
    # computed while its exchange was in flight; inner_s is then the compute that overlapped
    # this round's wall time (the next round's), and the losses are this round's own
    overlapped: bool = False
    start_digest: str = ""  # the group state the round started from
    # (peer, sha256, weight) of every aggregated contribution: what a round certificate names
    contributions: tuple[tuple[str, str, float], ...] = ()
    steps: int = 0  # inner steps trained (H, or fewer when the round's deadline came first)
    # under `inner.deadline_s: auto`, the deadline the group's step times give the next round
    # (aggregation/steps.py, agreed_deadline); None when this round did not average
    next_deadline_s: float | None = None

    @property
    def verified(self) -> bool:
        """True when the group's aggregate (not only our own update) was applied."""
        return self.outcome == "averaged"

    @property
    def concluded(self) -> bool:
        """True when the group ended the round on one state together: averaged, or too small
        to average (every member then applies the same empty aggregate)."""
        return self.outcome in ("averaged", "too-small")


def whole_steps(weight: float) -> bool:
    """True for a step count a member can have trained: a whole number, at least 1 (under
    `averaging.weight: steps` any other claim is an offence: a claim near 0 would be rescaled
    by a huge factor, aggregation/steps.py)."""
    return weight >= 1 and float(weight).is_integer()


def weight_problem(weight: float, max_weight: float, steps: bool) -> str | None:
    """Why a positive claimed weight is one no honest member sends (an offence), or None: above
    what one round can produce, or with `steps` not a whole number of steps."""
    if weight > max_weight:
        return f"weight {weight:g} > {max_weight:g} (one round's most)"
    if steps and weight > 0 and not whole_steps(weight):
        return f"weight {weight:g} is not a whole number of steps"
    return None


def select_contributions(
    group: GroupResult,
    mine: MemberMeta,
    max_weight: float = float("inf"),
    banned: Mapping[str, str] | None = None,
    steps: bool = False,
) -> tuple[list[MemberMeta], dict[str, str]]:
    """The members whose contributions enter the aggregate (sorted by peer id; this peer
    included), and every other member with the reason it was left out. A weight above what one
    round can produce (`max_weight`, node/config.py), or with `steps` one that is not a whole
    number of steps, is a rejected contribution, never a bigger or smaller vote; `banned`
    members (node/engine/trust.py) are left out whatever they sent."""
    present = {m.peer for m in group.members}
    excluded = {**group.missing, **{p: w for p, w in (banned or {}).items() if p in present}}
    chosen = []
    for member in sorted(group.members, key=lambda m: m.peer):
        if member.peer in excluded:
            continue
        if (member.round, member.start_digest) != (mine.round, mine.start_digest):
            excluded[member.peer] = f"round {member.round} / another start state"
        elif member.peer not in group.contributions:
            excluded[member.peer] = "no contribution"
        elif not member.weight > 0:
            excluded[member.peer] = "zero weight"
        elif (problem := weight_problem(member.weight, max_weight, steps)) is not None:
            excluded[member.peer] = problem
        else:
            chosen.append(member)
    return chosen, excluded


@dataclass
class LocalUpdate:
    """One member's contribution to a round: its pseudo-gradient, metadata and inner stats."""

    delta: Params
    meta: MemberMeta
    inner: InnerResult


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
    origin: Params | None = None,
    deadline_s: float | None = None,
) -> LocalUpdate:
    """Steps 1-3: H inner steps from theta^{t-1} (with any per-step momentum), then Delta_i.
    `origin` starts the steps elsewhere (an overlapped round's eager point, `eager_origin`):
    Delta_i is then measured from it, and the metadata still names `state`. `deadline_s` is
    this round's deadline under `inner.deadline_s: auto` (the group's, `agreed_deadline`);
    otherwise the config's."""
    steps = config.inner.steps
    origin = state.params if origin is None else origin
    fixed, per_iterate = start.correction, None
    if momentum is not None:
        momentum.begin_round(origin, state.round)
        if momentum.uses_iterate:
            per_iterate = momentum
        else:
            fixed = _sum(fixed, momentum.correction(origin, steps))

    def after_step(_: int) -> None:
        if fixed is not None:
            trainer.shift_params(fixed)
        own = per_iterate.correction(trainer.get_params(), steps) if per_iterate else None
        if own is not None:
            trainer.shift_params(own)

    trainer.set_params(origin)
    hooked = fixed is not None or per_iterate is not None
    limit = config.inner.fixed_deadline() if deadline_s is None else deadline_s
    deadline = None if limit is None else time.monotonic() + limit
    inner = trainer.train_steps(steps, after_step if hooked else None, deadline=deadline)
    final = trainer.get_params()
    if observe is not None:  # e.g. the cluster bench's task signatures
        observe(origin, final)
    if momentum is not None:
        momentum.end_round(final, state.round)
    delta = pseudo_gradient(origin, final)
    weight = inner.steps if config.averaging.weight == "steps" else inner.tokens
    step_s = inner.seconds / inner.steps
    meta = MemberMeta(peer, state.round, start.digest, float(weight), known=known, step_s=step_s)
    return LocalUpdate(delta, meta, inner)


def eager_origin(state: GroupState, delta: Params, config: RunConfig) -> Params:
    """Where a member expects its group to land while the aggregate is in flight: the outer
    step of theta^{t-1} with its own Delta standing in for the aggregate (the eager update of
    Kale et al. 2025, arXiv 2502.12996). Only the parameters; the group's outer state moves
    when the real aggregate arrives."""
    return load_outer(state, config).step(state.params, delta, RoundContext(1, 1))


def restamp(update: LocalUpdate, state: GroupState) -> LocalUpdate:
    """An overlapped update offered to the round that starts from `state` (the concluded group
    state it will be applied to), instead of the one its compute started from."""
    meta = dataclasses.replace(update.meta, round=state.round, start_digest=state.digest())
    return LocalUpdate(update.delta, meta, update.inner)


def outer_phase(
    state: GroupState,
    aggregate: Params,
    context: RoundContext,
    config: RunConfig,
    offenders: set[str] | frozenset[str] = frozenset(),
) -> tuple[GroupState, int | None]:
    """Step 5: theta^t from the agreed aggregate, and the offence record with this round's
    offenders added; returns the whole new state and the GHBM tau used."""
    outer = load_outer(state, config)
    tau = getattr(outer, "tau", None)
    new_params = outer.step(state.params, aggregate, context)
    offences = record_offences(state.offences, offenders, state.round, config.admission)
    return GroupState(state.round + 1, new_params, outer.state_dict(), offences), tau


def combine(
    contributions: Sequence[Tensors], weights: Sequence[float], config: RunConfig
) -> Params:
    """The group update from the chosen contributions: zero updates dropped (unless the run
    averages plainly); under `averaging.weight: steps` each rescaled to the members' median step
    count with equal weights (aggregation/steps.py; a no-op when all trained H steps); norms
    bounded; then the configured aggregator."""
    settings = config.averaging
    if settings.norm_bound is not None or settings.aggregator == "centered-clip":
        contributions, weights = without_empty(contributions, weights)
    if settings.weight == "steps":
        contributions, weights = normalize_steps(contributions, weights)
    if settings.norm_bound is not None:
        contributions, _ = bound_norms(contributions, weights, settings.norm_bound)
    if settings.aggregator == "centered-clip":
        robust, _ = centered_clip(
            contributions, weights, settings.clip_scale, settings.clip_iterations
        )
        return robust
    return weighted_mean(contributions, weights)


def group_context(members: list[MemberMeta]) -> RoundContext:
    """Participation as the group agreed it: members, and the most peers any member knew of."""
    if len(members) < 2:
        return RoundContext(1, 1)
    population = max(m.known for m in members)
    return RoundContext(len(members), max(population, len(members)))


def conclude_round(
    state: GroupState,
    update: LocalUpdate,
    answer: GroupResult | AveragingFailed,
    config: RunConfig,
) -> tuple[GroupState, RoundReport]:
    """Steps 4-5 after the transport answered: choose contributions, aggregate, outer step."""
    mine = update.meta
    group = answer if isinstance(answer, GroupResult) else None
    chosen: list[MemberMeta] = []
    excluded: dict[str, str] = {}
    offenders: set[str] = set()
    if group is None:
        outcome: Outcome = "no-group"
        problem = str(answer)
        log.warning("round %d: no group (%s); applying the local update", mine.round + 1, problem)
    else:
        max_weight = max_round_weight(config)
        kept_out = banned(state.offences, state.round, config.admission)
        steps = config.averaging.weight == "steps"
        chosen, excluded = select_contributions(group, mine, max_weight, kept_out, steps)
        # only weights the member's own blob claimed count (the rest were relayed by a leader)
        over = {
            m.peer
            for m in group.members
            if m.peer in group.contributions and weight_problem(m.weight, max_weight, steps)
        }
        offenders = (group.offences | over) - set(kept_out) - {mine.peer}
        outcome, problem = "averaged", ""
        least = config.averaging.min_group_size
        if len(chosen) < 2 or mine.peer not in {m.peer for m in chosen}:
            outcome, problem = "rejected", "no usable contribution from another member"
            log.warning("round %d: %s; applying the local update", mine.round + 1, problem)
        elif len(chosen) < least:
            outcome = "too-small"
            problem = f"{len(chosen)} usable contributions, min_group_size {least}"
            log.warning("round %d: %s; nothing aggregated", mine.round + 1, problem)
        for peer, why in sorted(excluded.items()):
            log.warning("round %d: excluded %s: %s", mine.round + 1, peer[-8:], why)
    if outcome == "averaged" and group is not None:
        aggregate = combine(
            [group.contributions[m.peer] for m in chosen], [m.weight for m in chosen], config
        )
    elif outcome == "too-small":  # a group this small has no majority to trust: no update
        aggregate = {k: torch.zeros_like(v) for k, v in update.delta.items()}
    else:
        chosen, aggregate = [], update.delta
    started = time.perf_counter()
    new_state, tau = outer_phase(state, aggregate, group_context(chosen), config, offenders)
    inner = update.inner
    report = RoundReport(
        round=state.round,
        loss_first=inner.loss_first,
        loss_mean=inner.loss_mean,
        loss_last=inner.loss_last,
        tokens=inner.tokens,
        steps=inner.steps,
        group_size=max(len(chosen), 1),
        outcome=outcome,
        problem=problem,
        members=tuple(m.peer for m in chosen),
        excluded=tuple(sorted(excluded)),
        offenders=tuple(sorted(offenders)),
        digest=new_state.digest(),
        bytes_sent=group.bytes_sent if group else 0,
        bytes_received=group.bytes_received if group else 0,
        inner_s=inner.seconds,
        matchmaking_s=group.matchmaking_s if group else 0.0,
        transfer_s=group.transfer_s if group else 0.0,
        outer_s=time.perf_counter() - started,
        tau=tau,
        start_digest=mine.start_digest,
        contributions=tuple(
            (m.peer, m.sha256, float(m.weight)) for m in chosen if outcome == "averaged"
        ),
        next_deadline_s=next_deadline(chosen, config) if outcome == "averaged" else None,
    )
    return new_state, report


def next_deadline(chosen: Sequence[MemberMeta], config: RunConfig) -> float | None:
    """Under `inner.deadline_s: auto`, the next round's deadline from the step times of the
    members whose contributions this round aggregated (each member of the group computes it
    from the same gathered metadata); None otherwise."""
    if config.inner.deadline_s != "auto":
        return None
    return agreed_deadline([m.step_s for m in chosen], config.inner.steps)
