"""The Transport interface the round loop runs against, and an in-memory implementation.

The hivemind implementation lives in node/swarm_transport.py; the in-memory one drives the simulator and
fast multi-node tests, with faults injectable (a member that drops out, a corrupted average).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from aggregation.params import Params, weighted_mean
from node.state import GroupState
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
    """No group formed, or the all-reduce broke; the caller falls back to its own update."""


class StateUnavailable(RuntimeError):
    """No provider served an intact copy of an announced state."""


@dataclass
class GroupResult:
    """The averaged pseudo-gradient and what every member said; byte counts are this peer's.

    `malformed` names members whose tensors are in the average but whose metadata could not be
    parsed; `wire_offset` is the constant the transport added on the wire (for the checksum's
    rounding tolerance, aggregation/verify.py)."""

    averaged: Params
    members: list[MemberMeta]
    bytes_sent: int = 0
    bytes_received: int = 0
    matchmaking_s: float = 0.0
    allreduce_s: float = 0.0
    malformed: tuple[str, ...] = ()
    wire_offset: float = 0.0


@dataclass(frozen=True)
class StateRef:
    """A group state announced in the swarm: its round, digest and who can serve it."""

    round: int
    digest: str
    providers: tuple[str, ...]


class Transport(Protocol):
    """What the round loop needs from the network."""

    peer: str

    def all_reduce(self, delta: Params, meta: MemberMeta) -> GroupResult: ...
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
    """Shared by the in-memory transports of one simulated group; a barrier per round."""

    expected: int
    timeout: float = 10.0
    corrupt_rounds: set[int] = field(default_factory=set)
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _pending: dict[tuple[int, str], dict[str, tuple[Params, MemberMeta]]] = field(
        default_factory=dict
    )
    _results: dict[tuple[int, str], GroupResult] = field(default_factory=dict)
    states: dict[str, GroupState] = field(default_factory=dict)

    def contribute(self, delta: Params, meta: MemberMeta) -> GroupResult:
        """Block until `expected` members of this round and start state arrived (or timeout),
        then average; like the hivemind transport, other rounds or states never meet."""
        deadline = time.monotonic() + self.timeout
        key = (meta.round, meta.start_digest)
        with self._lock:
            group = self._pending.setdefault(key, {})
            group[meta.peer] = (delta, meta)
            while key not in self._results and len(group) < self.expected:
                if not self._lock.wait(max(deadline - time.monotonic(), 0)):
                    break
            if key not in self._results:
                self._results[key] = self._finish(meta.round, group)
                self._lock.notify_all()
            result = self._results[key]
        if meta.peer not in {m.peer for m in result.members}:
            raise AveragingFailed(f"round {meta.round}: group formed without {meta.peer}")
        return result

    def _finish(self, round_: int, group: dict[str, tuple[Params, MemberMeta]]) -> GroupResult:
        if len(group) < 2:
            return GroupResult({}, [])
        members = [m for _, m in group.values()]
        averaged = weighted_mean([d for d, _ in group.values()], [m.weight for m in members])
        if round_ in self.corrupt_rounds:  # fault injection: a silently partial all-reduce
            first = next(iter(averaged))
            averaged[first] = averaged[first] * 0.5
        return GroupResult(averaged, members)


class InMemoryTransport:
    """One member's view of an InMemoryHub."""

    def __init__(self, hub: InMemoryHub, peer: str) -> None:
        self.hub = hub
        self.peer = peer

    def all_reduce(self, delta: Params, meta: MemberMeta) -> GroupResult:
        """Average with whoever reaches the same round in time."""
        result = self.hub.contribute({k: v.clone() for k, v in delta.items()}, meta)
        return GroupResult({k: v.clone() for k, v in result.averaged.items()}, list(result.members))

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
            state.round, {k: v.clone() for k, v in state.params.items()}, dict(state.outer_state)
        )
