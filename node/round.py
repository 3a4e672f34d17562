"""One DiLoCo round (DESIGN.md 3.1), the same code for the simulator and the daemon.

1. start from the group's theta^{t-1}; 2. H inner AdamW steps; 3. Delta_i = theta^{t-1} - theta_i;
4. token-weighted all-reduce, verified by a linear checksum and the members' start digests;
5. outer step. A member alone, or whose all-reduce fails verification, applies its own Delta;
the digest consensus at the next round start then resyncs whoever diverged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from aggregation.outer import make_outer
from aggregation.params import Params, projection_checksum, pseudo_gradient, round_like_codec
from node.config import RunConfig
from node.state import GroupState
from node.trainer import InnerTrainer
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


def verify_group(result: GroupResult, mine: MemberMeta, rtol: float) -> str | None:
    """None if the average is what the members' checksums predict; otherwise why not."""
    members = result.members
    if len(members) < 2 or mine.peer not in {m.peer for m in members}:
        return f"group of {len(members)} without this peer"
    starts = Counter((m.round, m.start_digest) for m in members)
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
    transport: Transport, delta: Params, mine: MemberMeta, rtol: float
) -> tuple[Params, GroupResult | None, bool]:
    """(aggregate, group, verified): the group's weighted mean, or our own Delta if it failed."""
    try:
        result = transport.all_reduce(delta, mine)
    except AveragingFailed as exc:
        log.warning("round %d: averaging failed (%s); applying the local update", mine.round, exc)
        return delta, None, False
    problem = verify_group(result, mine, rtol)
    if problem is not None:
        log.warning("round %d: rejecting the group average: %s", mine.round, problem)
        return delta, result, False
    return result.averaged, result, True


def run_round(
    state: GroupState, trainer: InnerTrainer, transport: Transport, config: RunConfig
) -> tuple[GroupState, RoundReport]:
    """Advance the group state by one DiLoCo round; inputs are not mutated."""
    trainer.set_params(state.params)
    inner = trainer.train_steps(config.inner.steps)
    delta = round_like_codec(
        pseudo_gradient(state.params, trainer.get_params()), config.averaging.codec
    )
    mine = MemberMeta(
        transport.peer,
        state.round,
        state.digest(),
        float(inner.tokens),
        projection_checksum(delta, seed=state.round),
    )
    aggregate, group, verified = average(transport, delta, mine, config.averaging.verify_rtol)
    aggregate = round_like_codec(aggregate, config.averaging.codec)

    started = time.perf_counter()
    outer = make_outer(config.outer.name, **config.outer.hyperparameters())
    if state.outer_state:
        outer.load_state_dict(state.outer_state)
    new_state = GroupState(state.round + 1, outer.step(state.params, aggregate), outer.state_dict())
    outer_s = time.perf_counter() - started
    trainer.set_params(new_state.params)

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
    )
    return new_state, report
