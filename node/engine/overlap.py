"""Overlapped rounds (docs/design.md, "Overlapped rounds"): communication behind compute.

A mode of the one round loop (node/engine/peer.py: Peer.run, Peer.advance), not a loop of
its own. A member hands round k's Delta_k to the exchange on its own thread and at once
computes the next pseudo-gradient from the eager point outer_step(theta^{k-1}, Delta_k)
(round.eager_origin). When that compute ends it waits for the answer, concludes round k exactly as a synchronous
member would (so the group stays bit-identical), and sends the new Delta tagged with theta^k.

After a resync the eager compute is still offered, tagged with the adopted state: a member
that dropped it would reach the next exchange a whole compute after the others, miss it, and
resync again, round after round (a late joiner never caught up that way). A move to another
group drops it; a (re)start has none: the pipeline starts with one compute that is not
overlapped.
"""

from __future__ import annotations

import threading

from swarmtune.node.engine.round import LocalUpdate
from swarmtune.node.engine.transport import AveragingFailed, GroupResult, Transport
from swarmtune.node.local.errors import RoundAbandoned

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
