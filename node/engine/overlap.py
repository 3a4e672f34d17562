"""Overlapped rounds (docs/design.md, "Overlapped rounds"): communication behind compute.

A member hands round k's Delta_k to the exchange on its own thread and at once computes the
next pseudo-gradient from the eager point outer_step(theta^{k-1}, Delta_k) (round.eager_origin).
When that compute ends it waits for the answer, concludes round k exactly as a synchronous
member would (so the group stays bit-identical), and sends the new Delta tagged with theta^k.
A resync, a move to another group, or a (re)start drops the eager compute: the pipeline starts
again from the adopted state.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from node.engine.round import LocalUpdate, conclude_round, eager_origin, restamp
from node.engine.state import GroupState
from node.engine.transport import AveragingFailed, GroupResult, Transport
from node.local.trainer import RoundAbandoned

if TYPE_CHECKING:
    from node.engine.peer import Peer

log = logging.getLogger("swarmtune.peer")


class InFlight:
    """One exchange on its own thread while the next inner phase computes (overlapped rounds).

    The thread is a daemon: a peer that stops does not wait for an exchange it no longer
    needs (the averager's own timeouts end it)."""

    def __init__(self, transport: Transport, update: LocalUpdate) -> None:
        self.update = update
        self._transport = transport
        self._answer: GroupResult | AveragingFailed | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        thread = threading.Thread(target=self._run, name="swarmtune-exchange", daemon=True)
        thread.start()

    def _run(self) -> None:
        try:
            self._answer = self._transport.exchange(self.update.delta, self.update.meta)
        except AveragingFailed as exc:
            self._answer = exc
        except BaseException as exc:  # re-raised in the round loop's thread by wait()
            self._error = exc
        finally:
            self._done.set()

    def wait(self, stop: threading.Event) -> GroupResult | AveragingFailed:
        """The transport's answer; RoundAbandoned as soon as `stop` is set."""
        while not self._done.wait(0.1):
            if stop.is_set():
                raise RoundAbandoned("stopped while the exchange was in flight")
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer


def run_overlapped(peer: Peer, rounds: int, settle_s: float) -> GroupState:
    """`rounds` rounds (or until stop) with each exchange in flight during the next compute."""
    state = peer.sync(peer.initial_state())
    peer.trainer.set_params(state.params)
    peer.transport.announce_state(state)
    pending: InFlight | None = None
    members: tuple[str, ...] = ()
    done = 0
    while done < rounds and not peer.stop.is_set():
        started = time.perf_counter()
        compute_s = 0.0
        try:
            if pending is None:  # (re)start the pipeline: this compute is not overlapped
                state, _ = peer.boundary(state)
                first = peer.compute(state)
                compute_s += first.inner.seconds
                pending = InFlight(peer.transport, first)
            following: LocalUpdate | None = None
            if done + 1 < rounds:
                origin = eager_origin(state, pending.update.delta, peer.config)
                following = peer.compute(state, origin)
                compute_s += following.inner.seconds
            answer = pending.wait(peer.stop)
        except Exception as exc:
            if not isinstance(exc, RoundAbandoned) and not peer.stop.is_set():
                raise
            log.info(
                "abandoned round %d (%s); last checkpoint is round %d",
                state.round + 1,
                exc,
                state.round,
            )
            peer.trainer.set_params(state.params)
            break
        concluded, report = conclude_round(state, pending.update, answer, peer.config)
        peer.trainer.set_params(concluded.params)
        report = peer.finish_round(concluded, report, started, overlapped=True, inner_s=compute_s)
        done += 1
        members = report.members + report.excluded
        state, restarted = peer.boundary(concluded)
        if restarted and following is not None:
            log.info("round %d: dropping the eager compute after a resync or move", state.round + 1)
            following = None
        pending = (
            InFlight(peer.transport, restamp(following, state)) if following is not None else None
        )
    if members:
        peer.await_members(state.round, members, settle_s)
    return peer.finish(state)
