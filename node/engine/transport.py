"""The Transport interface the round loop runs against, and an in-memory implementation.

A transport forms a group of members of the same round and start state and hands every member
the others' pseudo-gradients (an all-gather); aggregating them is the round's job. The hivemind
implementation lives in node/engine/swarm_transport.py; the in-memory one drives fast multi-node
tests, with faults injectable (a member that drops out, a contribution that does not arrive).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from swarmtune.aggregation.params import Params
from swarmtune.node.engine.certify import Candidate, Claim
from swarmtune.node.engine.state import GroupState, decode_state, encode_state
from swarmtune.protocols.certificates import Certificate, Vote
from swarmtune.protocols.group import GroupResult, MemberMeta

__all__ = [
    "AveragingFailed",
    "GroupResult",
    "MemberMeta",
    "StateUnavailable",
    "Transport",
]


class AveragingFailed(RuntimeError):
    """No group formed in time; the caller falls back to its own update."""


class StateUnavailable(RuntimeError):
    """No provider served an intact copy of an announced state."""


class Transport(Protocol):
    """What the round loop needs from the network."""

    peer: str

    def exchange(self, delta: Params, meta: MemberMeta, ahead: float = 0.0) -> GroupResult:
        """All-gather with the group of meta's round and state. `ahead`: seconds the others
        may still need before they come (an overlapped member starts its exchange a compute
        early), added to how long the group waits for them."""
        ...

    def keep_out(self, peers: dict[str, str]) -> None: ...

    def announce_state(
        self, state: GroupState, claim: Claim | None, chain: list[Certificate]
    ) -> None:
        """Serve `state` with the chain that proves it, and announce it with our vote."""
        ...

    def announcements(self) -> dict[str, tuple[int, str]]:
        """(round, digest) of every admitted, unbanned volunteer of our group, us included."""
        ...

    def claims(self) -> dict[str, Claim]:
        """The votes that come with those announcements."""
        ...

    def may_vote(self, vote: Vote) -> bool:
        """True when the vote's key is its peer's and the peer is admitted and not revoked."""
        ...

    def fetch_state(
        self, candidate: Candidate, max_bytes: int
    ) -> tuple[GroupState, list[Certificate]]:
        """A provider's state and its chain (unchecked: node/engine/certify.py checks); a state
        blob over `max_bytes` is refused as it arrives."""
        ...


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
    chains: dict[str, list[Certificate]] = field(default_factory=dict)
    claims: dict[str, Claim] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # member -> the key it votes with

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

    def announce(
        self, peer: str, state: GroupState, claim: Claim | None, chain: list[Certificate]
    ) -> None:
        """`peer` serves `state` with `chain`, and votes for it with `claim` (None: no vote)."""
        with self._lock:
            self.states[peer] = state
            self.chains[peer] = chain
            if claim is None:
                self.claims.pop(peer, None)
            else:
                self.claims[peer] = claim
                self.keys.setdefault(peer, claim.vote.key)

    def served(self) -> dict[str, tuple[GroupState, list[Certificate]]]:
        """Every member's last announced state and its chain."""
        with self._lock:
            return {p: (s, list(self.chains.get(p, []))) for p, s in self.states.items()}

    def votes(self) -> dict[str, Claim]:
        """Every member's vote for the state it announced."""
        with self._lock:
            return dict(self.claims)

    def key_of(self, peer: str) -> str | None:
        """The key `peer` first voted with."""
        with self._lock:
            return self.keys.get(peer)

    def gathered(self, updates: list[tuple[Params, MemberMeta]], viewer: str) -> GroupResult:
        """The all-gather of members that are all here at once, as `viewer` sees it: the
        simulator's sequential rounds, with the same copies and injected faults as `contribute`."""
        group = {meta.peer: (delta, meta) for delta, meta in updates}
        if len(group) < 2:
            raise AveragingFailed("nobody else came")
        return self._view(group, group[viewer][1])

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

    def announce_state(
        self, state: GroupState, claim: Claim | None = None, chain: list[Certificate] | None = None
    ) -> None:
        """Offer this state, its chain and our vote to others."""
        self.hub.announce(self.peer, state, claim, list(chain or []))

    def announcements(self) -> dict[str, tuple[int, str]]:
        """(round, digest) that every member announced last."""
        return {p: (s.round, s.digest()) for p, (s, _) in self.hub.served().items()}

    def claims(self) -> dict[str, Claim]:
        """Every member's vote for the state it announced."""
        return self.hub.votes()

    def may_vote(self, vote: Vote) -> bool:
        """In process, a member's key is the one it first voted with."""
        return self.hub.key_of(vote.peer) == vote.key

    def fetch_state(
        self, candidate: Candidate, max_bytes: int
    ) -> tuple[GroupState, list[Certificate]]:
        """A provider's state and chain, through the wire encoding (as the swarm's would)."""
        served = self.hub.served()
        held = [served[p] for p in candidate.providers if p in served and p != self.peer]
        if not held:
            raise StateUnavailable(f"no provider serves round {candidate.round}")
        state, chain = held[0]
        blob = encode_state(state)
        if len(blob) > max_bytes:
            raise StateUnavailable(f"state blob is {len(blob)} bytes, over {max_bytes}")
        return decode_state(blob), list(chain)
