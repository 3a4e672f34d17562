"""Overlapped rounds (docs/design.md, "Overlapped rounds"): communication behind compute.

A member hands round k's Delta_k to the exchange on its own thread and at once computes the
next pseudo-gradient from the eager point outer_step(theta^{k-1}, Delta_k) (round.eager_origin).
When that compute ends it waits for the answer, concludes round k exactly as a synchronous
member would (so the group stays bit-identical), and sends the new Delta tagged with theta^k.

After a resync the eager compute is still offered, tagged with the adopted state: a member
that dropped it would reach the next exchange a whole compute after the others, miss it, and
resync again, round after round (a late joiner never caught up that way). A move to another
group drops it; a (re)start has none: the pipeline starts with one compute that is not
overlapped.
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
# an overlapped member joins matchmaking a whole compute before a synchronous member (or a
# slower overlapped one) does: its first window is longer by this many of its own last
# compute times, so that the group is not closed without them
AHEAD = 1.5


class InFlight:
    """One exchange on its own thread while the next inner phase computes (overlapped rounds).

    The thread is a daemon: a peer that stops does not wait for an exchange it no longer
    needs (the averager's own timeouts end it)."""

    def __init__(self, transport: Transport, update: LocalUpdate, ahead: float) -> None:
        self.update, self.ahead = update, ahead
        self._transport = transport
        self._answer: GroupResult | AveragingFailed | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        thread = threading.Thread(target=self._run, name="swarmtune-exchange", daemon=True)
        thread.start()

    def _run(self) -> None:
        try:
            update = self.update
            self._answer = self._transport.exchange(update.delta, update.meta, self.ahead)
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
    state = peer.start()
    state, _ = peer.boundary(state)  # later boundaries close each iteration
    pending: InFlight | None = None
    members: tuple[str, ...] = ()
    done = 0
    while done < rounds and not peer.stop.is_set():
        started = time.perf_counter()
        compute_s = 0.0
        try:
            if pending is None:  # (re)start the pipeline: this compute is not overlapped
                first = peer.compute(state)
                compute_s += first.inner.seconds
                # everyone's first exchange follows a plain compute: nobody is a compute ahead
                pending = InFlight(peer.transport, first, 0.0)
            following: LocalUpdate | None = None
            if done + 1 < rounds:
                origin = eager_origin(state, pending.update.delta, peer.config)
                following = peer.compute(state, origin)
                compute_s += following.inner.seconds
            answer = pending.wait(peer.stop)
        except Exception as exc:
            peer.abandon(exc, state)
            break
        concluded, report = conclude_round(state, pending.update, answer, peer.config)
        peer.trainer.set_params(concluded.params)
        report = peer.finish_round(concluded, report, started, overlapped=True, inner_s=compute_s)
        done += 1
        members = report.members + report.excluded
        if not report.concluded:  # alone or left with our own update: probably diverged
            members = tuple(p for p in peer.transport.announcements() if p != peer.transport.peer)
        # as in synchronous rounds, let the group announce this round before the resync check
        # (members conclude the same exchange together, so this is usually milliseconds):
        # otherwise a diverged member's state could win a tie against a healthy one's
        peer.await_members(concluded.round, members, peer.config.averaging.matchmaking_time)
        state, moved = peer.boundary(concluded)
        if moved and following is not None:
            log.info("round %d: dropping the eager compute of the group we left", state.round + 1)
            following = None
        if following is not None:
            ahead = AHEAD * following.inner.seconds
            pending = InFlight(peer.transport, restamp(following, state), ahead)
        else:
            pending = None
    if members:
        peer.await_members(state.round, members, settle_s)
    return peer.finish(state)
