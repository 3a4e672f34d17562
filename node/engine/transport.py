"""The Transport interface the round loop runs against, and an in-memory implementation.

A transport forms a group of members of the same round and start state and hands every member
the others' pseudo-gradients (an all-gather); aggregating them is the round's job. The hivemind
implementation lives in node/engine/swarm_transport.py; the in-memory one drives fast multi-node
tests, with faults injectable (a member that drops out, a contribution that does not arrive).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from aggregation.params import Params
from node.engine.state import GroupState
from protocols.averaging import MemberMeta

__all__ = [
    "AveragingFailed",
    "GroupResult",
    "MemberMeta",
    "StateRef",
    "StateUnavailable",
    "Transport",
    "consensus",
]


class AveragingFailed(RuntimeError):
    """No group formed in time; the caller falls back to its own update."""


class StateUnavailable(RuntimeError):
    """No provider served an intact copy of an announced state."""


@dataclass
class GroupResult:
    """A formed group: every member's metadata, the contributions that arrived intact (this
    peer's own included), why the others did not, and this peer's costs."""

    members: list[MemberMeta]
    contributions: dict[str, Params]
    missing: dict[str, str] = field(default_factory=dict)
    offences: set[str] = field(default_factory=set)  # missing for what they themselves served
    bytes_sent: int = 0
    bytes_received: int = 0
    matchmaking_s: float = 0.0
    transfer_s: float = 0.0


@dataclass(frozen=True)
class StateRef:
    """A group state announced in the swarm: its round, digest and who can serve it."""

    round: int
    digest: str
    providers: tuple[str, ...]


class Transport(Protocol):
    """What the round loop needs from the network."""

    peer: str

    def exchange(self, delta: Params, meta: MemberMeta, ahead: float = 0.0) -> GroupResult:
        """All-gather with the group of meta's round and state. `ahead`: seconds the others
        may still need before they come (an overlapped member starts its exchange a compute
        early), added to how long the group waits for them."""
        ...

    def keep_out(self, peers: dict[str, str]) -> None: ...
    def announce_state(self, state: GroupState) -> None: ...
    def announcements(self) -> dict[str, tuple[int, str]]: ...
    def fetch_state(self, ref: StateRef) -> GroupState: ...


def consensus(announced: dict[str, tuple[int, str]], exclude: str | None = None) -> StateRef | None:
    """Highest round wins; then the digest most peers hold; ties go to the smaller digest.

    `exclude` leaves one peer's own announcement out (a peer that just moved to another group
    adopts that group's state instead of voting for its own)."""
    announced = {p: v for p, v in announced.items() if p != exclude}
    if not announced:
        return None
    top = max(r for r, _ in announced.values())
    votes = Counter(d for r, d in announced.values() if r == top)
    digest = min(votes, key=lambda d: (-votes[d], d))
    providers = tuple(sorted(p for p, (r, d) in announced.items() if (r, d) == (top, digest)))
    return StateRef(top, digest, providers)


@dataclass
class InMemoryHub:
    """Shared by the in-memory transports of one simulated group; a barrier per round and state.

    Fault injection: `lost[round]` names members whose contribution reaches nobody that round;
    `hidden[round]` is a (receiver, sender) pair: that one receiver misses that one sender."""

    expected: int
    timeout: float = 10.0
    lost: dict[int, set[str]] = field(default_factory=dict)
    hidden: dict[int, tuple[str, str]] = field(default_factory=dict)
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _pending: dict[tuple[int, str], dict[str, tuple[Params, MemberMeta]]] = field(
        default_factory=dict
    )
    _closed: set[tuple[int, str]] = field(default_factory=set)
    states: dict[str, GroupState] = field(default_factory=dict)

    def contribute(self, delta: Params, meta: MemberMeta, ahead: float = 0.0) -> GroupResult:
        """Block until `expected` members of this round and start state arrived (or timeout,
        plus `ahead`); like the hivemind transport, other rounds or states never meet."""
        deadline = time.monotonic() + self.timeout + ahead
        key = (meta.round, meta.start_digest)
        with self._lock:
            if key in self._closed:
                raise AveragingFailed(f"round {meta.round}: the group already formed")
            group = self._pending.setdefault(key, {})
            group[meta.peer] = (delta, meta)
            while key not in self._closed and len(group) < self.expected:
                if not self._lock.wait(max(deadline - time.monotonic(), 0)):
                    break
            self._closed.add(key)
            self._lock.notify_all()
            members = dict(group)
        if len(members) < 2:
            raise AveragingFailed(f"round {meta.round}: nobody else came")
        return self._view(members, meta)

    def _view(self, group: dict[str, tuple[Params, MemberMeta]], mine: MemberMeta) -> GroupResult:
        lost = set(self.lost.get(mine.round, set()))
        receiver, sender = self.hidden.get(mine.round, ("", ""))
        if receiver == mine.peer:
            lost.add(sender)
        lost.discard(mine.peer)
        contributions = {
            p: {k: v.clone() for k, v in d.items()} for p, (d, _) in group.items() if p not in lost
        }
        missing = {p: "lost in transit (injected)" for p in group if p in lost}
        return GroupResult([m for _, m in group.values()], contributions, missing)


class InMemoryTransport:
    """One member's view of an InMemoryHub."""

    def __init__(self, hub: InMemoryHub, peer: str) -> None:
        self.hub = hub
        self.peer = peer

    def keep_out(self, peers: dict[str, str]) -> None:
        """Nothing to do in process: the round excludes banned members itself."""

    def exchange(self, delta: Params, meta: MemberMeta, ahead: float = 0.0) -> GroupResult:
        """All-gather with whoever reaches the same round and state in time."""
        return self.hub.contribute({k: v.clone() for k, v in delta.items()}, meta, ahead)

    def announce_state(self, state: GroupState) -> None:
        """Offer this state to others."""
        with self.hub._lock:
            self.hub.states[self.peer] = state

    def announcements(self) -> dict[str, tuple[int, str]]:
        """(round, digest) that every member announced last."""
        with self.hub._lock:
            return {p: (s.round, s.digest()) for p, s in self.hub.states.items()}

    def fetch_state(self, ref: StateRef) -> GroupState:
        """Copy a provider's state."""
        with self.hub._lock:
            state = self.hub.states.get(ref.providers[0]) if ref.providers else None
        if state is None:
            raise StateUnavailable(f"no provider serves round {ref.round}")
        return GroupState(
            state.round,
            {k: v.clone() for k, v in state.params.items()},
            dict(state.outer_state),
            {p: list(r) for p, r in state.offences.items()},
        )
