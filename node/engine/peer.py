"""A volunteer's life across rounds, independent of the transport: resume, sync, train, save.

Every round that did not apply its group's aggregate is counted (no group, rejected
result), and so is every state adopted from others (resync); the counts travel in each
RoundReport, so a broken averager cannot hide behind the next round's resync.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from swarmtune.aggregation.methods import make_peer_momentum
from swarmtune.aggregation.params import Params
from swarmtune.node.config import RunConfig
from swarmtune.node.engine.certify import Candidate, Ledger, NotCertified, candidates, verify_chain
from swarmtune.node.engine.checkpoint import Checkpoint
from swarmtune.node.engine.outer_state import check_outer, state_cap
from swarmtune.node.engine.overlap import AHEAD, InFlight
from swarmtune.node.engine.round import (
    LocalUpdate,
    RoundReport,
    conclude_round,
    eager_origin,
    inner_phase,
    restamp,
    round_start,
)
from swarmtune.node.engine.state import GroupState, StateError, check_params
from swarmtune.node.engine.transport import StateUnavailable, Transport
from swarmtune.node.engine.trust import banned
from swarmtune.node.local.errors import RoundAbandoned
from swarmtune.protocols.certificates import Vote
from swarmtune.protocols.identity import Identity

if TYPE_CHECKING:  # the trainer's libraries (transformers, peft) load only where it runs
    from swarmtune.node.local.trainer import InnerTrainer

log = logging.getLogger("swarmtune.peer")


class RoundHooks(Protocol):
    """Wiring that runs at every round boundary (a clustered run's group moves)."""

    def before_round(self, state: GroupState) -> bool:
        """Called before each round's sync; True when this peer just changed group."""
        ...


@dataclass
class RoundCounts:
    """Running totals of rounds that did not go as planned, for reports and status."""

    fallbacks: int = 0  # no group formed in time: local update applied
    rejections: int = 0  # a group left nothing usable (or too few, min_group_size) to aggregate
    exclusions: int = 0  # group members' contributions left out (stale, lost, malformed)
    resyncs: int = 0  # adopted another member's state (or went back to our witnessed one)
    unproven: int = 0  # announced states refused: no proof the run produced them


class Peer:
    """Drives rounds for one volunteer; the simulator's tests and the daemon both use it."""

    def __init__(
        self,
        trainer: InnerTrainer,
        transport: Transport,
        config: RunConfig,
        checkpoint: Checkpoint | None = None,
        on_report: Callable[[RoundReport], None] | None = None,
        evaluate: Callable[[], Mapping[str, float | None]] | None = None,
        hooks: RoundHooks | None = None,
        stop: threading.Event | None = None,
        overlap: bool | None = None,
        eval_every: int = 1,
        wait_for: int = 1,
        identity: Identity | None = None,
        ticket: str = "",
    ) -> None:
        self.trainer = trainer
        self.transport = transport
        self.config = config
        self.checkpoint = checkpoint
        self.on_report = on_report or (lambda report: None)
        self.evaluate = evaluate
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        self.eval_every = eval_every  # held-out eval after rounds whose number it divides
        self.wait_for = wait_for  # volunteers (ourselves included) to see before round one
        self.hooks = hooks
        self.stop = stop if stop is not None else threading.Event()
        self.shapes = {k: v.shape for k, v in trainer.get_params().items()}
        self.state_cap = state_cap(self.shapes, config)  # the largest honest state blob
        self.resumed_from: int | None = None
        self.resynced_to: list[int] = []
        self.counts = RoundCounts()
        self.reported_resyncs = 0  # resyncs already in a report (the next says if it resynced)
        # each exchange in flight during the next compute (node/engine/overlap.py)
        self.overlap = config.averaging.overlap if overlap is None else overlap
        self.banned: dict[str, str] = {}  # peers the group keeps out this round, with why
        self.deadline_s: float | None = None  # `inner.deadline_s: auto`: the group's last say
        outer = config.outer
        self.momentum = make_peer_momentum(outer.name, outer.effective_momentum, outer.tau)
        # what this peer vouches for and which states it may adopt (node/engine/certify.py)
        self.ledger = Ledger(identity or Identity.generate(), transport.peer, config.run_id, ticket)
        # every peer of the run derives round 0 from the manifest's seed: its digest is trusted
        self.ledger.hold(GroupState(0, trainer.get_params(), {}))

    def initial_state(self) -> GroupState:
        """The checkpoint if there is one, else round 0 from the seeded LoRA init."""
        if self.checkpoint is not None:
            loaded = self.checkpoint.load(self.shapes, lambda s: check_outer(s, self.config))
            if loaded is not None:
                state, local = loaded
                if local is not None:
                    self.load_local(local)
                self.resumed_from = state.round
                self.ledger.resume(state)
                log.info("resumed from checkpoint at round %d", state.round)
                return state
        return GroupState(0, self.trainer.get_params(), {})

    def load_local(self, local: dict) -> None:
        """This peer's own state (AdamW moments, data position, momentum anchors); one that
        does not fit (e.g. another data set behind the same work dir) is dropped with a
        warning, keeping fresh moments, instead of crashing on every restart."""
        try:
            self.trainer.load_state_dict(local)
            if self.momentum is not None and "momentum" in local:
                self.momentum.load_state_dict(local["momentum"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("local.pt does not fit this peer (%s); starting with fresh moments", exc)
            self.trainer.reset_optimizer()

    def may_vote(self, vote: Vote) -> bool:
        """Whose votes count: admitted, unrevoked peers (the transport) not banned by our group."""
        return vote.peer not in self.banned and self.transport.may_vote(vote)

    def sync(self, state: GroupState, adopt: bool = False) -> GroupState:
        """Adopt the best state a quorum of the group vouches for when it is ahead of ours, or
        level with ours and better supported (docs/design.md, 8. Trust, "States carry proof").

        With `adopt` (we just joined another group) our own vote does not count: the group's
        state wins whatever its round. A state we trained alone (no group vouches for it) gives
        way to one vouched for at any round, or, when others are around and none is, to the
        last state a group concluded with us: rounds nobody witnessed cannot be proven."""
        me = self.transport.peer
        claims = self.transport.claims()
        self.ledger.collect(claims, self.may_vote)
        announced = set(self.transport.announcements())  # one read of the records for both uses
        population = len(announced | {me})
        ours, witnessed = state.digest(), self.ledger.witnessed
        back = witnessed.digest() if witnessed is not None else ours
        alone = self.ledger.claim is None and back != ours
        for candidate in candidates(claims, population, self.may_vote, me if adopt else ""):
            if candidate.digest == ours and not adopt:
                return state  # the best-supported state is ours
            if candidate.round < state.round and not (adopt or alone):
                return state
            if alone and candidate.digest == back and witnessed is not None:
                return self.go_back(state, witnessed)
            adopted = self.adopt(candidate, population)
            if adopted is not None:
                return adopted
        if alone and witnessed is not None and announced - {me}:
            return self.go_back(state, witnessed)
        return state

    def adopt(self, candidate: Candidate, population: int) -> GroupState | None:
        """The candidate's state if a provider serves it with a chain that proves it."""
        try:
            fetched, chain = self.transport.fetch_state(candidate, self.state_cap)
            check_params(fetched.params, self.shapes)
            if fetched.digest() != candidate.digest:
                raise StateError("the provider serves another state than the one vouched for")
            check_outer(fetched, self.config)
            proof = verify_chain(
                chain,
                fetched,
                self.config.run_id,
                self.ledger.trusted,
                candidate.votes,
                population,
                self.may_vote,
            )
        except StateUnavailable as exc:
            log.warning("could not fetch round %d state (%s); keeping ours", candidate.round, exc)
            return None
        except (StateError, NotCertified) as exc:
            self.counts.unproven += 1
            log.warning("refused the round %d state: %s", candidate.round, exc)
            return None
        log.info("synced to the group's state at round %d", fetched.round)
        self.ledger.adopt(fetched, proof)
        self.resynced_to.append(fetched.round)
        self.counts.resyncs += 1
        self.save(fetched)  # a restart resumes from it, and "last checkpoint" says so
        return fetched

    def go_back(self, state: GroupState, witnessed: GroupState) -> GroupState:
        """Leave a state only we trained (round `state.round`) for the last one our group
        concluded with us, which the others share: otherwise we never meet them again."""
        log.warning(
            "round %d was trained alone and nobody can vouch for it; going back to round %d,"
            " the last state the group concluded with us",
            state.round,
            witnessed.round,
        )
        self.resynced_to.append(witnessed.round)
        self.counts.resyncs += 1
        self.save(witnessed)
        return witnessed

    def run(self, rounds: int, settle_s: float = 0.0) -> GroupState:
        """Run `rounds` rounds (or until stop is set), checkpointing and announcing each. The
        one round loop of the daemon, synchronous or overlapped (node/engine/overlap.py)."""
        state = self.start()
        following: LocalUpdate | None = None  # overlapped: the next round's update, computed
        members: tuple[str, ...] = ()
        agreed: tuple[str, ...] = ()  # members who concluded the round's state with us
        digest = ""  # that state's
        for done in range(rounds):
            if self.stop.is_set():
                break
            eager = self.overlap and done + 1 < rounds  # no compute past the last round
            try:
                state, report, following = self.advance(state, following, eager)
            except Exception as exc:
                self.abandon(exc, state)
                break
            members = report.members + report.excluded
            agreed, digest = (report.members, report.digest) if report.concluded else ((), "")
            if not report.concluded:  # alone, or left with our own update: probably diverged
                members = tuple(
                    p for p in self.transport.announcements() if p != self.transport.peer
                )
            # let the group announce this round before the next sync picks a consensus, so a
            # member that diverged is resynced before the next round, not after it, and their
            # votes complete our certificate (members conclude the same exchange together:
            # usually milliseconds)
            wait = self.config.averaging.matchmaking_time
            self.await_members(state.round, members, wait, agreed, digest)
        if members:
            self.await_members(state.round, members, settle_s, agreed, digest)
        return self.finish(state)

    def start(self) -> GroupState:
        """Resume or sync, announce where we start, and wait for `wait_for` volunteers unless
        the run is under way (a resume, or a sync to a later round, announces past round 0)."""
        state = self.sync(self.initial_state())
        self.trainer.set_params(state.params)
        self.announce(state)
        if state.round == 0:
            self.await_volunteers(self.wait_for)
        return state

    def await_volunteers(self, count: int, every_s: float = 10.0) -> None:
        """Block until `count` volunteers (ourselves included) have announced a state, a group
        vouches for one past round 0 (the run started without us), or stop is set; says how
        many are in every `every_s` seconds. A run started together this way has no first
        round in which the earliest volunteers wait for the last to load."""
        if count <= 1:
            return
        log.info("waiting for %d volunteers before the first round", count)
        said = time.monotonic()
        while True:
            announced = self.transport.announcements()
            seen = len(set(announced) | {self.transport.peer})
            if seen >= count:
                log.info("%d volunteers are in; starting", seen)
                return
            vouched = candidates(self.transport.claims(), seen, self.may_vote)
            if vouched and vouched[0].round > 0:
                log.info("the run is under way (%d volunteers in); starting", seen)
                return
            if time.monotonic() - said >= every_s:
                log.info("still waiting: %d of %d volunteers are in", seen, count)
                said = time.monotonic()
            if self.stop.wait(0.5):
                return

    def one_round(self, state: GroupState) -> tuple[GroupState, RoundReport]:
        """One synchronous round from `state`: the boundary (sync), train, exchange, conclude."""
        concluded, report, _ = self.advance(state, None, eager=False)
        return concluded, report

    def advance(
        self, state: GroupState, following: LocalUpdate | None, eager: bool
    ) -> tuple[GroupState, RoundReport, LocalUpdate | None]:
        """One round from `state`: the boundary (a group move, the resync check, bans), then
        this round's update (`following`, computed during the last exchange, else a fresh
        compute) goes to the exchange on its own thread; with `eager` the next round's update
        is computed while it is in flight, from the eager point. Then the round is concluded,
        saved, reported and announced (in that order, so that what others read about this
        peer is never a round behind its state). Returns the concluded state, the report and
        the next round's update (None unless `eager`)."""
        started = time.perf_counter()
        state, moved = self.boundary(state)
        if moved and following is not None:
            log.info("round %d: dropping the eager compute of the group we left", state.round + 1)
            following = None
        compute_s = 0.0
        if following is None:  # (re)starting the pipeline: this compute is not overlapped
            update, ahead = self.compute(state), 0.0
            compute_s += update.inner.seconds
        else:  # computed a whole compute before the others of a synchronous group are here
            update, ahead = restamp(following, state), AHEAD * following.inner.seconds
        # on its own thread also when nothing overlaps it: a stop does not wait for the
        # exchange to time out
        flight = InFlight(self.transport, update, ahead)
        following = None
        if eager:
            following = self.compute(state, eager_origin(state, update.delta, self.config))
            compute_s += following.inner.seconds
        answer = flight.wait(self.stop)
        concluded, report = conclude_round(state, update, answer, self.config)
        self.trainer.set_params(concluded.params)
        report = self.finish_round(concluded, report, started, self.overlap, compute_s)
        return concluded, report, following

    def abandon(self, exc: Exception, state: GroupState) -> None:
        """End the round in progress after `exc`, keeping `state` (the last checkpoint), when
        it is a stop; re-raise anything else. A terminal's Ctrl+C also reaches hivemind's helper
        processes, which may die mid-exchange before our handler's stop is seen: while
        stopping, that is the same abandoned round, not a crash."""
        if not isinstance(exc, RoundAbandoned) and not self.stop.is_set():
            raise exc
        log.info(
            "abandoned round %d (%s); last checkpoint is round %d",
            state.round + 1,
            exc,
            state.round,
        )
        self.trainer.set_params(state.params)

    def boundary(self, state: GroupState) -> tuple[GroupState, bool]:
        """What happens between two rounds: a clustered peer's move, the resync check, this
        round's bans. Returns the state to go on from, and True when this peer moved to
        another group (an overlapped peer's eager compute then belongs to the old one)."""
        moved = self.hooks.before_round(state) if self.hooks is not None else False
        synced = self.sync(state, adopt=moved)
        self.keep_out(synced)
        return synced, moved

    def compute(self, state: GroupState, origin: Params | None = None) -> LocalUpdate:
        """The inner phase of the round that starts from `state` (from `origin` if given)."""
        known = max(len(self.transport.announcements()), 1)
        start = round_start(state, self.config)
        return inner_phase(
            state,
            start,
            self.trainer,
            self.transport.peer,
            self.config,
            self.momentum,
            known,
            origin=origin,
            deadline_s=self.deadline_s,
        )

    def finish_round(
        self,
        state: GroupState,
        report: RoundReport,
        started: float,
        overlapped: bool = False,
        inner_s: float | None = None,
    ) -> RoundReport:
        """Count what went wrong, save, evaluate, report and announce a concluded round."""
        self.counts.fallbacks += report.outcome == "no-group"
        self.counts.rejections += report.outcome in ("rejected", "too-small")
        self.counts.exclusions += len(report.excluded)
        if report.next_deadline_s is not None:
            self.deadline_s = report.next_deadline_s
        if report.concluded:
            self.ledger.conclude(report.start_digest, state, report.contributions)
        else:
            self.ledger.alone(state)
        checkpoint_s = self.save(state)
        due = state.round % self.eval_every == 0
        metrics = self.evaluate() if self.evaluate is not None and due else {}
        report = replace(
            report,
            inner_s=report.inner_s if inner_s is None else inner_s,
            checkpoint_s=checkpoint_s,
            eval_loss=metrics.get("eval_loss"),
            eval_exact=metrics.get("eval_exact"),
            wall_s=time.perf_counter() - started,
            resynced=self.counts.resyncs > self.reported_resyncs,
            fallbacks=self.counts.fallbacks,
            rejections=self.counts.rejections,
            exclusions=self.counts.exclusions,
            resyncs=self.counts.resyncs,
            unproven=self.counts.unproven,
            banned=len(self.banned),
            overlapped=overlapped,
        )
        self.reported_resyncs = self.counts.resyncs
        self.on_report(report)
        self.announce(state)
        return report

    def announce(self, state: GroupState) -> None:
        """Serve `state` with its proof, and our vote when our group concluded it."""
        claim = self.ledger.claim
        vouched = claim is not None and claim.digest == state.digest()
        self.transport.announce_state(state, claim if vouched else None, self.ledger.chain)

    def keep_out(self, state: GroupState) -> None:
        """Tell the transport whom the group bans for this round, logging each new ban."""
        kept_out = banned(state.offences, state.round, self.config.admission)
        for peer in sorted(set(kept_out) - set(self.banned)):
            log.warning("keeping %s out of the group: %s", peer[-8:], kept_out[peer])
        self.banned = kept_out
        self.transport.keep_out(kept_out)

    def await_members(
        self,
        round_: int,
        members: tuple[str, ...],
        timeout: float,
        agreed: tuple[str, ...] = (),
        digest: str = "",
    ) -> None:
        """Wait (bounded) until every listed member has announced a state of at least round_,
        and each member in `agreed` (who concluded the state `digest` with us) that state
        itself or a later round. A record of our round number with another digest is not their
        vote for this state: it is left from an earlier try at the round (a member that trained
        it alone and went back), and collecting votes from it left our certificate one vote
        short for good, so that nobody could adopt a state whose chain reached back through
        it. (`digest` is the round report's: no second hash of the state per round.)"""

        def announced(peer: str, seen: dict[str, tuple[int, str]]) -> bool:
            their_round, their_digest = seen.get(peer, (-1, ""))
            if their_round != round_:
                return their_round > round_
            return peer not in agreed or their_digest == digest

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            seen = self.transport.announcements()
            if all(announced(peer, seen) for peer in members):
                return
            time.sleep(0.1)

    def save(self, state: GroupState) -> float:
        """Checkpoint if this peer has a work dir; returns seconds."""
        if self.checkpoint is None:
            return 0.0
        local = self.trainer.state_dict()
        if self.momentum is not None:
            local["momentum"] = self.momentum.state_dict()
        return self.checkpoint.save(state, local)

    def finish(self, state: GroupState) -> GroupState:
        """Adopt the consensus of our final round, so the group ends on one adapter; not when
        stopped (Ctrl+C, SIGTERM): then leaving promptly comes first."""
        if self.stop.is_set():
            return state
        synced = self.sync(state)
        if synced is not state:  # (sync saved it)
            self.announce(synced)
            self.trainer.set_params(synced.params)
        return synced
