"""A volunteer's life across rounds, independent of the transport: resume, sync, train, save."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from aggregation.ghbm import make_peer_momentum
from node.checkpoint import Checkpoint
from node.config import RunConfig
from node.round import RoundReport, run_round
from node.state import GroupState, StateError, check_params
from node.trainer import InnerTrainer, RoundAbandoned
from node.transport import Transport, consensus

log = logging.getLogger("swarmtune.peer")


class Peer:
    """Drives rounds for one volunteer; the simulator and the daemon both use it."""

    def __init__(
        self,
        trainer: InnerTrainer,
        transport: Transport,
        config: RunConfig,
        checkpoint: Checkpoint | None = None,
        on_report: Callable[[RoundReport], None] | None = None,
        evaluate: Callable[[], float] | None = None,
    ) -> None:
        self.trainer = trainer
        self.transport = transport
        self.config = config
        self.checkpoint = checkpoint
        self.on_report = on_report or (lambda report: None)
        self.evaluate = evaluate
        self.shapes = {k: v.shape for k, v in trainer.get_params().items()}
        self.stop = threading.Event()
        trainer.stop = self.stop
        self.resumed_from: int | None = None
        self.resynced_to: list[int] = []
        outer = config.outer
        self.momentum = make_peer_momentum(outer.name, outer.effective_momentum, outer.tau)
        self.gossip = config.averaging.gossip
        self.before_round: Callable[[GroupState], None] = lambda state: None

    def initial_state(self) -> GroupState:
        """The checkpoint if there is one, else round 0 from the seeded LoRA init."""
        if self.checkpoint is not None:
            loaded = self.checkpoint.load(self.shapes)
            if loaded is not None:
                state, local = loaded
                if local is not None:
                    self.trainer.load_state_dict(local)
                    if self.momentum is not None and "momentum" in local:
                        self.momentum.load_state_dict(local["momentum"])
                self.resumed_from = state.round
                log.info("resumed from checkpoint at round %d", state.round)
                return state
        return GroupState(0, self.trainer.get_params(), {})

    def sync(self, state: GroupState) -> GroupState:
        """Adopt the swarm's consensus state when it is ahead of, or differs from, ours."""
        ref = consensus(self.transport.announcements())
        if ref is None or ref.round < state.round:
            return state
        if ref.round == state.round and (self.gossip or ref.digest == state.digest()):
            return state  # gossip partners differ by design; only catch up on rounds
        try:
            fetched = self.transport.fetch_state(ref)
            check_params(fetched.params, self.shapes)
        except (StateError, OSError, RuntimeError, KeyError) as exc:
            log.warning("could not fetch round %d state (%s); keeping ours", ref.round, exc)
            return state
        if fetched.digest() != ref.digest:
            log.warning("fetched state does not match its announced digest; keeping ours")
            return state
        log.info("synced to the group's state at round %d (was at %d)", fetched.round, state.round)
        self.resynced_to.append(fetched.round)
        return fetched

    def run(self, rounds: int, settle_s: float = 0.0) -> GroupState:
        """Run `rounds` rounds (or until stop is set), checkpointing and announcing each."""
        state = self.sync(self.initial_state())
        self.trainer.set_params(state.params)
        self.transport.announce_state(state)
        members: tuple[str, ...] = ()
        for _ in range(rounds):
            if self.stop.is_set():
                break
            round_started = time.perf_counter()
            try:
                self.before_round(state)  # may train (a clustered run's signature probe)
                state = self.sync(state)
                known = max(len(self.transport.announcements()), 1)
                state, report = run_round(
                    state,
                    self.trainer,
                    self.transport,
                    self.config,
                    self.momentum,
                    known,
                )
            except RoundAbandoned as exc:
                log.info(
                    "abandoned round %d (%s); last checkpoint is round %d",
                    state.round + 1,
                    exc,
                    state.round,
                )
                self.trainer.set_params(state.params)
                break
            checkpoint_s = self.save(state)
            self.transport.announce_state(state)
            eval_loss = self.evaluate() if self.evaluate is not None else None
            wall_s = time.perf_counter() - round_started
            self.on_report(
                replace(report, checkpoint_s=checkpoint_s, eval_loss=eval_loss, wall_s=wall_s)
            )
            members = report.members
            if not report.verified and members and not self.gossip:
                # the group diverged: let every member announce before anyone picks a consensus
                self.await_members(state.round, members, self.config.averaging.matchmaking_time)
        if members:
            self.await_members(state.round, members, settle_s)
        return self.finish(state)

    def await_members(self, round_: int, members: tuple[str, ...], timeout: float) -> None:
        """Wait (bounded) until every listed member has announced a state of at least round_."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            seen = self.transport.announcements()
            if all(seen.get(peer, (-1, ""))[0] >= round_ for peer in members):
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
        """Adopt the consensus of our final round, so the group ends on one adapter."""
        synced = self.sync(state)
        if synced is not state:
            self.save(synced)
            self.transport.announce_state(synced)
            self.trainer.set_params(synced.params)
        return synced
