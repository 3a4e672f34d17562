"""swarmtune's changes to hivemind's matchmaking, made in the averager's own process.

hivemind runs each averager in a forked process: its join-request handler cannot see the
parent's objects, so what it needs from the parent lives in shared memory, updated there:

- the refused set (revoked or banned peers) and the admission gate: a leader turns such peers
  away before they enter its group (docs/design.md, 8. Trust);
- the admission check on the follower side: a leader's ACCEPTED answer carries its own
  gathered data (its ticket), and a follower walks away from a leader without a valid ticket
  or in the refused set before the group forms, so an unadmitted peer cannot lead admitted
  followers away from the rest of their group;
- the expected group size: the members known to hold this round's start state. A leader
  closes its group the moment that many have joined, instead of waiting out the matchmaking
  window; the window stays the fallback for a member that does not come.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import typing
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2P, P2PContext, P2PDaemonError, PeerID, StubBase
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer

from swarmtune.protocols.admission import Gate
from swarmtune.protocols.hivemind_private import set_target_group_size, step_control

log = logging.getLogger("swarmtune.matchmaking")


class RefusedSet:
    """Peer ids refused at matchmaking, shared with the averager's process."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self._data: Any = mp.Array("c", capacity)  # a ctypes char array: has .value
        self._version = mp.Value("q", 0)
        self.refused_joins = mp.Value("q", 0)  # join requests turned away, for logs and status
        self._cache: tuple[int, frozenset[str]] = (-1, frozenset())

    def update(self, peers: set[str]) -> None:
        """Replace the refused set (called by the parent; peers beyond capacity are dropped)."""
        data = "\n".join(sorted(peers)).encode()
        if len(data) >= len(self._data):  # keep whole ids only
            cut = data.rfind(b"\n", 0, len(self._data) - 1)
            data = data[:cut] if cut > 0 else b""
        with self._data.get_lock():
            self._data.value = data
            self._version.value += 1

    def current(self) -> frozenset[str]:
        """The refused set as last updated (read in either process)."""
        version = self._version.value
        if version != self._cache[0]:
            with self._data.get_lock():
                raw = self._data.value.decode()
            self._cache = (version, frozenset(p for p in raw.split("\n") if p))
        return self._cache[1]


class GatedAverager(DecentralizedAverager):
    """A DecentralizedAverager whose leader turns away join requests from peers in the refused
    set, or without a valid ticket when the run has a gate, before they enter its group, and
    closes its group once the expected members are in. The follower's ticket
    travels in its gathered metadata (JoinRequest.gather), the leader's in its ACCEPTED answer;
    a follower leaves a leader it would refuse itself."""

    # The averager's own (forked) process sets this in run(): hivemind's follower code reaches
    # a leader through the class's get_stub, which has no instance to ask.
    _own: ClassVar[GatedAverager | None] = None

    def __init__(self, *args: Any, gate: Gate | None, refused: RefusedSet, **kwargs: Any) -> None:
        self.gate, self.refused = gate, refused
        self.expected = mp.Value("q", 0)  # members expected this round (0: unknown)
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        type(self)._own = self  # runs in the averager's process only
        super().run()

    # get_stub, _shutdown and run override hivemind internals (pinned 1.1.12 in pyproject.toml;
    # tests/protocols/test_hivemind_internals.py checks each); the other private names we use
    # live in protocols/hivemind_private.py
    @classmethod
    def get_stub(cls, p2p: P2P, peer: PeerID, *, namespace: str | None = None) -> StubBase:
        stub = super().get_stub(p2p, peer, namespace=namespace)
        return stub if cls._own is None else _CheckedLeader(stub, peer, cls._own)

    async def _shutdown(self, timeout: float | None) -> None:
        """hivemind's shutdown (in the averager's process), which first unregisters our handlers
        from p2pd. A terminal's Ctrl+C reaches the whole process group, p2pd included, so p2pd
        may be gone already: then there is nothing left to unregister, and its missing control
        socket is the end we wanted, not a traceback for the volunteer's log."""
        try:
            await super()._shutdown(timeout)
        except (OSError, P2PDaemonError) as exc:
            log.debug("p2pd was gone before the averager unregistered its handlers: %r", exc)

    def expect(self, members: int) -> None:
        """Close groups when `members` (ourselves included) have gathered; 0 or 1: unknown."""
        self.expected.value = members

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:  # noqa: UP006
        # (hivemind's servicer recognises streamed responses by typing.AsyncIterator only)
        """Refuse unadmitted or refused peers; hand everyone else to hivemind's matchmaking."""
        peer = context.remote_id.to_base58()
        why = self._refusal(peer, request.gather)
        if why is not None:
            with self.refused.refused_joins.get_lock():
                self.refused.refused_joins.value += 1
            log.warning("refused a join request from %s: %s", peer[-8:], why)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        expected = self.expected.value
        # hivemind's leader assembles its group as soon as target_group_size members are in
        set_target_group_size(self, expected if expected >= 2 else None)
        async for response in super().rpc_join_group(request, context):
            step = step_control(self)
            if response.code == averaging_pb2.ACCEPTED and step is not None:
                response.gathered.append(step.data_for_gather)  # our ticket, for the follower
            yield response

    def _refusal(self, peer: str, gather: bytes) -> str | None:
        if peer in self.refused.current():
            return "revoked or banned"
        if self.gate is None:
            return None
        try:  # hivemind wraps the caller's serialized data: [bandwidth, mode, bytes]
            ticket = MSGPackSerializer.loads(MSGPackSerializer.loads(gather)[2]).get("ticket")
        except Exception:  # noqa: BLE001 - untrusted bytes: any failure is a malformed request
            return "malformed metadata"
        return self.gate.check(peer, ticket)


class _CheckedLeader:
    """A leader's stub whose join answer is checked: an ACCEPTED from a leader that we would
    refuse (no valid ticket in the answer, or in our refused set) becomes a refusal, and
    hivemind's follower moves on to the next potential leader."""

    def __init__(self, stub: StubBase, leader: PeerID, own: GatedAverager) -> None:
        self._stub, self._leader, self._own = stub, leader.to_base58(), own

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, timeout: float | None = None
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        stream = await self._stub.rpc_join_group(request, timeout=timeout)
        return self._checked(stream)

    async def _checked(
        self, stream: AsyncIterator[averaging_pb2.MessageFromLeader]
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        try:
            async for message in stream:
                if message.code == averaging_pb2.ACCEPTED:
                    why = self._own._refusal(self._leader, (list(message.gathered) or [b""])[0])
                    if why is not None:
                        log.warning("did not follow leader %s: %s", self._leader[-8:], why)
                        yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
                        return
                yield message
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
