"""Admission tickets and the refused set shared with the averager process."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarmtune.protocols.admission import (
    CLOCK_SKEW_S,
    Gate,
    TicketError,
    issue_ticket,
    public_key_of,
    read_ticket,
)
from swarmtune.protocols.matchmaking import RefusedSet

KEY = RSAPrivateKey()
COORDINATOR = RSASignatureValidator(KEY).local_public_key.decode()
PEER = "QmVolunteerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
NOW = 1_800_000_000.0


def test_a_ticket_admits_its_peer_in_its_run_until_it_expires() -> None:
    ticket = issue_ticket(KEY, "run-a", PEER, 3600, now=NOW)
    gate = Gate(COORDINATOR, "run-a")
    assert gate.check(PEER, ticket, now=NOW) is None
    assert gate.check(PEER, ticket, now=NOW + 3599) is None
    assert "expired" in (gate.check(PEER, ticket, now=NOW + 3600) or "")
    assert read_ticket(ticket).peer == PEER and len(ticket) < 1024


@pytest.mark.parametrize(
    "peer, run, now, why",
    [
        ("QmSomeoneElse", "run-a", NOW, "belongs to peer"),
        (PEER, "run-b", NOW, "for run 'run-a'"),
        (PEER, "run-a", NOW - CLOCK_SKEW_S - 10, "in the future"),
    ],
)
def test_a_ticket_does_not_transfer(peer: str, run: str, now: float, why: str) -> None:
    ticket = issue_ticket(KEY, "run-a", PEER, 3600, now=NOW)
    assert why in (Gate(COORDINATOR, run).check(peer, ticket, now=now) or "")


def test_only_the_runs_coordinator_can_issue_tickets() -> None:
    forged = issue_ticket(RSAPrivateKey(), "run-a", PEER, 3600, now=NOW)
    assert "not signed" in (Gate(COORDINATOR, "run-a").check(PEER, forged, now=NOW) or "")
    # a genuine ticket whose claims were edited (a longer expiry) no longer verifies
    head, payload, signature = issue_ticket(KEY, "run-a", PEER, 60, now=NOW).split(".")
    other = issue_ticket(KEY, "run-a", PEER, 10**6, now=NOW).split(".")[1]
    edited = f"{head}.{other}.{signature}"
    assert "not signed" in (Gate(COORDINATOR, "run-a").check(PEER, edited, now=NOW) or "")
    assert payload != other


@pytest.mark.parametrize("ticket", ["", None, 42, "st1.x", "st2.a.b", "st1.!!!.###", "x" * 5000])
def test_garbage_tickets_are_refused_in_one_line(ticket: object) -> None:
    why = Gate(COORDINATOR, "run-a").check(PEER, ticket, now=NOW)
    assert why is not None and "\n" not in why


def test_a_manifest_without_a_coordinator_key_has_no_gate() -> None:
    with pytest.raises(TicketError):
        public_key_of("")
    with pytest.raises(TicketError):
        public_key_of("[owner:not a key]")


def _read_in_child(refused: RefusedSet, go: mp.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(sorted(refused.current()))
    go.wait(10)
    out.put(sorted(refused.current()))


def test_the_refused_set_reaches_a_forked_process_after_it_started() -> None:
    refused = RefusedSet(capacity=200)
    refused.update({"QmA", "QmB"})
    assert refused.current() == {"QmA", "QmB"}
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = ctx.Event()
    child = ctx.Process(target=_read_in_child, args=(refused, go, out))
    child.start()
    assert out.get(timeout=10) == ["QmA", "QmB"]
    refused.update({"QmC"})  # after the fork: the child must see the new set
    go.set()
    assert out.get(timeout=10) == ["QmC"]
    child.join(10)
    # more ids than fit: whole ids only, never a truncated one
    many = {f"Qm{i:040d}" for i in range(10)}
    refused.update(many)
    assert refused.current() and refused.current() <= many


def _join_request(ticket: object) -> object:
    from hivemind.proto import averaging_pb2
    from hivemind.utils import MSGPackSerializer

    # what hivemind's follower sends: its gathered data wrapped as [bandwidth, mode, bytes]
    data = MSGPackSerializer.dumps({"ticket": ticket})
    return averaging_pb2.JoinRequest(gather=MSGPackSerializer.dumps([1.0, 0, data]))


def _leader(refused: RefusedSet):  # type: ignore[no-untyped-def]
    from swarmtune.protocols.matchmaking import GatedAverager

    leader = GatedAverager.__new__(GatedAverager)  # the refusal path needs no running averager
    leader.gate, leader.refused = Gate(COORDINATOR, "run-a"), refused
    leader._parent_pid = -1  # never started: nothing for its __del__ to shut down
    return leader


def _answer(leader, peer_id, request) -> list:  # type: ignore[no-untyped-def]
    import asyncio
    from types import SimpleNamespace

    context = SimpleNamespace(remote_id=peer_id)

    async def collect() -> list:
        return [m async for m in leader.rpc_join_group(request, context)]

    return asyncio.run(collect())


def test_a_leader_refuses_and_counts_every_unadmitted_revoked_or_malformed_join() -> None:
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2

    from swarmtune.protocols.admission import issue_ticket as issue

    peer_id = PeerID.from_base58("QmX4e7geuVFGHwzj6d3h963dW33VgsSQtHYR1n8DzKdkUK")
    peer = peer_id.to_base58()
    tiny = RefusedSet(capacity=10)
    tiny.update({"QmLongerThanTheCapacity"})  # beyond capacity: dropped whole, never cut
    assert tiny.current() == frozenset()
    refused = RefusedSet(capacity=200)
    leader = _leader(refused)
    valid = issue(KEY, "run-a", peer, 3600)
    assert leader._refusal(peer, _join_request(valid).gather) is None  # admitted: let through
    requests = [
        _join_request(None),  # no ticket
        _join_request(issue(KEY, "run-a", "QmSomeoneElse", 3600)),  # someone else's ticket
        averaging_pb2.JoinRequest(gather=b"\x00not msgpack"),
    ]
    for count, request in enumerate(requests, start=1):
        answer = _answer(leader, peer_id, request)
        assert [m.code for m in answer] == [averaging_pb2.PROTOCOL_VIOLATION]
        assert refused.refused_joins.value == count
    refused.update({peer})  # revoked or banned: refused whatever its ticket
    assert [m.code for m in _answer(leader, peer_id, _join_request(valid))] == [
        averaging_pb2.PROTOCOL_VIOLATION
    ]
    assert refused.refused_joins.value == 4


class _LeaderStub:
    """What hivemind's follower gets from get_stub: a join answered with `answers`."""

    def __init__(self, answers: list) -> None:  # type: ignore[type-arg]
        self.answers, self.closed = answers, False

    async def rpc_join_group(self, request, timeout=None):  # type: ignore[no-untyped-def]
        async def stream():  # type: ignore[no-untyped-def]
            try:
                for answer in self.answers:
                    yield answer
            finally:
                self.closed = True

        return stream()


def test_a_follower_leaves_a_leader_it_would_refuse_before_the_group_forms() -> None:
    import asyncio

    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2

    from swarmtune.protocols.matchmaking import _CheckedLeader

    leader_id = PeerID.from_base58("QmX4e7geuVFGHwzj6d3h963dW33VgsSQtHYR1n8DzKdkUK")
    leader = leader_id.to_base58()
    refused = RefusedSet(capacity=200)
    follower = _leader(refused)  # the same refusal rules, now applied to our leader

    def follow(gathered: list[bytes]) -> tuple[list[int], bool]:
        accepted = averaging_pb2.MessageFromLeader(code=averaging_pb2.ACCEPTED, gathered=gathered)
        begin = averaging_pb2.MessageFromLeader(code=averaging_pb2.BEGIN_ALLREDUCE)
        stub = _LeaderStub([accepted, begin])
        checked = _CheckedLeader(stub, leader_id, follower)  # type: ignore[arg-type]

        async def collect() -> list[int]:
            stream = await checked.rpc_join_group(averaging_pb2.JoinRequest())
            try:
                return [m.code async for m in stream]
            finally:
                await stream.aclose()

        return asyncio.run(collect()), stub.closed

    ticket = _join_request(issue_ticket(KEY, "run-a", leader, 3600)).gather  # type: ignore[attr-defined]
    admitted = [averaging_pb2.ACCEPTED, averaging_pb2.BEGIN_ALLREDUCE]
    assert follow([ticket]) == (admitted, True)
    refusal = ([averaging_pb2.PROTOCOL_VIOLATION], True)  # and the leader's stream is closed
    assert follow([]) == refusal  # a leader that shows no ticket
    assert follow([_join_request(None).gather]) == refusal  # type: ignore[attr-defined]
    someone_elses = issue_ticket(KEY, "run-a", "QmSomeoneElse", 3600)
    assert follow([_join_request(someone_elses).gather]) == refusal  # type: ignore[attr-defined]
    refused.update({leader})  # banned or revoked: not followed whatever its ticket
    assert follow([ticket]) == refusal
    assert refused.refused_joins.value == 0  # joins refused as a leader are counted apart
