"""HivemindTransport wiring that needs no network: group switches and record updates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarmtune.node.engine.state import GroupState
from swarmtune.node.engine.swarm_transport import HivemindTransport
from swarmtune.protocols.identity import Identity
from swarmtune.protocols.record_store import RecordStore
from swarmtune.protocols.records import AdapterOffer, PeerRecord
from swarmtune.protocols.transfer import BlobServer

SIGNER, ID = RSASignatureValidator(RSAPrivateKey()), Identity.generate()

PEER = "QmTestPeer0000000000"


class _Averager:
    def __init__(self, prefix: str) -> None:
        self.prefix, self.closed, self.matchmaking_time = prefix, False, 1.0
        self.refused_joins = 2
        self.suspects: dict[str, int] = {}

    def shutdown(self) -> None:
        self.closed = True


class _Stored:
    def result(self) -> bool:
        return True

    def add_done_callback(self, callback: Callable[[_Stored], None]) -> None:
        callback(self)


class _DHT:
    """What the record store hands the DHT: every stored peer record, as it would arrive."""

    def __init__(self) -> None:
        self.stored: list[PeerRecord] = []

    def store(self, key: str, value: dict, **_: object) -> _Stored:
        self.stored.append(PeerRecord.model_validate(value))
        return _Stored()


class _Node:
    peer_id = PEER

    def __init__(self, record: PeerRecord | None = None) -> None:
        self.dht = _DHT()
        self.records = RecordStore(self.dht, SIGNER, ID, "run")  # type: ignore[arg-type]
        self.records.set_record(record or PeerRecord(peer_id=PEER, role="volunteer"), store=False)

    @property
    def stored(self) -> list[PeerRecord]:
        return self.dht.stored


def test_switching_group_withdraws_the_old_groups_state() -> None:
    node = _Node(PeerRecord(peer_id=PEER, role="volunteer", round=7, digest="ab" * 32))
    transport = HivemindTransport(node, _Averager, "run_global")  # type: ignore[arg-type]
    first = transport.averager
    transport.switch_group("run_cluster3", 3)
    assert first.closed and transport.averager.prefix == "run_cluster3"
    stored = node.stored[-1]
    # our round-7 state is the old group's: announcing it in cluster 3 would outvote its members
    assert stored.cluster == 3 and stored.digest == ""
    assert transport.cluster == 3
    # join requests the closed averager refused still count
    assert transport.refused_joins == 4


def test_expected_members_are_the_live_volunteers_not_ahead_of_us_at_a_strange_state() -> None:
    digest, other, earlier = "ab" * 32, "cd" * 32, "ef" * 32
    records = {
        "QmA": PeerRecord(peer_id="QmA0000000000", role="volunteer", round=4, digest=digest),
        "QmB": PeerRecord(peer_id="QmB0000000000", role="volunteer", round=4, digest=other),
        "QmC": PeerRecord(peer_id="QmC0000000000", role="volunteer", round=2, digest=earlier),
        "QmD": PeerRecord(peer_id="QmD0000000000", role="coordinator", round=4, digest=digest),
        "QmE": PeerRecord(peer_id="QmE0000000000", role="volunteer", round=4, digest=digest),
        "QmF": PeerRecord(peer_id="QmF0000000000", role="volunteer", round=4, digest=""),
        "QmG": PeerRecord(peer_id="QmG0000000000", role="volunteer", round=9, digest=other),
    }
    node = _Node()
    node.records.peers = lambda: records  # type: ignore[method-assign]
    transport = HivemindTransport(node, _Averager, "run_global")  # type: ignore[arg-type]
    transport._held = {earlier, digest}  # the states we announced so far
    # A and E (at our state), B (our round, another state: it missed a group and resyncs), C
    # (behind: it may catch up), ourselves; not the coordinator, not F (no state: it is moving
    # between groups), not G (ahead, at a state we never held: a stranger's announcement must
    # not hold the group for its full window)
    assert transport.expected_peers(set(), digest, 4) == {"QmA", "QmB", "QmC", "QmE", PEER}
    assert transport.expected_peers({"QmE"}, digest, 4) == {"QmA", "QmB", "QmC", PEER}  # banned
    # a suspected withholder at another state (C, behind) is not waited for; one at our state
    # (A) still is: it will join, and the group must not close before an honest member is in
    assert transport.expected_peers(set(), digest, 4, {"QmC"}) == {"QmA", "QmB", "QmE", PEER}
    assert len(transport.expected_peers(set(), digest, 4, {"QmA"})) == 5
    transport._held.add(other)  # G is ahead at a state we held (we are the one behind)
    assert len(transport.expected_peers(set(), digest, 4)) == 6


class _Forming(_Averager):
    """Forms a group of whoever `came` names (its members' metadata), after `expected`; before
    that it runs `during()` and polls once, as matchmaking does."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.came: list[str] = []
        self.expected: list[int] = []
        self.during: Callable[[], None] = lambda: None
        self.after: Callable[[], None] = lambda: None  # once the group formed

    def set_refused(self, refused: dict) -> None:
        pass

    def expect(self, members: int) -> None:
        self.expected.append(members)

    def exchange(self, delta, meta, **kwargs):  # noqa: ANN001, ANN003, ANN201
        from swarmtune.protocols.group import GroupResult, MemberMeta

        self.expected.append(kwargs["expected"])
        self.during()
        kwargs["moved_on"]()
        self.after()
        members = [MemberMeta(p, meta.round, meta.start_digest, 1.0) for p in [PEER, *self.came]]
        return GroupResult(members, {})


def _forming(digest: str, *peers: str) -> tuple[dict[str, PeerRecord], HivemindTransport]:
    """A transport over a _Forming averager, and the records it reads (volunteers at round 4
    of `digest`; a test changes them in place)."""
    records = {
        p: PeerRecord(peer_id=p + "0000000000", role="volunteer", round=4, digest=digest)
        for p in peers
    }
    node = _Node()
    node.records.peers = lambda: records  # type: ignore[method-assign]
    return records, HivemindTransport(node, _Forming, "run_global", started_together=True)  # type: ignore[arg-type]


def test_a_member_that_did_not_come_is_not_waited_for_again_until_it_announces_anew() -> None:
    """Found by bench/churn.py: a killed volunteer's record outlives it by up to PEER_TTL, and
    every round waited its full matchmaking window for it. Now a peer expected in a round whose
    group formed without it is not expected again while its record stays the same; once it
    stores another (a restart, even at the same state) it is, also mid-matchmaking."""
    from swarmtune.protocols.group import MemberMeta

    digest = "ab" * 32
    records, transport = _forming(digest, "QmA", "QmB", "QmDead")
    node = transport.node
    averager = transport.averager
    meta = MemberMeta(PEER, 4, digest, 1.0)
    averager.came = ["QmA", "QmB"]  # QmDead does not come: the group waited its window
    transport.exchange({}, meta)
    assert averager.expected[-1] == 4  # the first time it is still waited for
    transport.exchange({}, meta)
    assert averager.expected[-1] == 3  # then no longer
    back = PeerRecord(peer_id="QmDead0000000000", role="volunteer", round=4, digest=digest)

    def restart() -> None:  # it restarts while the others match: its new record shows up
        records["QmDead"] = back.model_copy(update={"stored_at": 1.0})

    averager.during = restart
    transport.exchange({}, meta)
    assert averager.expected[-2:] == [3, 4]  # counted without it, then waited for once seen
    records["QmDead"] = PeerRecord(
        peer_id="QmDead0000000000", role="volunteer", round=6, digest="cd" * 32
    )  # or it announces the state it synced to
    assert "QmDead" in transport.expected_peers(set(), digest, 6)
    # a peer that stores a new record only after the group formed (a live one, a moment late)
    # is a no-show by the record we had seen, so its new one is expected next round
    late = PeerRecord(peer_id="QmLate0000000000", role="volunteer", round=4, digest=digest)
    records["QmLate"] = late
    averager.during = lambda: None
    averager.came = ["QmA", "QmB", "QmDead"]

    def stores_again() -> None:
        records["QmLate"] = late.model_copy(update={"stored_at": 2.0})

    averager.after = stores_again
    transport.exchange({}, meta)
    assert "QmLate" in transport.expected_peers(set(), digest, 4)
    # a round in which no group formed says nothing about any one peer
    fresh = HivemindTransport(node, _Forming, "run_global", started_together=True)  # type: ignore[arg-type]
    fresh.averager.came = []
    fresh.exchange({}, meta)
    assert fresh.no_shows == {}


class _Recording(_Averager):
    """Records how exchange() asked for a group, then finds none."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.asked: list[dict] = []

    def set_refused(self, refused: dict) -> None:
        pass

    def exchange(self, delta, meta, **kwargs):  # noqa: ANN001, ANN003, ANN201
        from swarmtune.protocols.averaging import AveragingError

        self.asked.append(kwargs)
        raise AveragingError("no group (test)")


def test_a_first_round_started_together_closes_its_group_from_membership() -> None:
    # join --wait-for: every volunteer of the first round has announced already, so the first
    # group needs no doubled window; otherwise it waits for members still loading
    from swarmtune.node.engine.transport import AveragingFailed, MemberMeta

    records = {
        f"Qm{c}": PeerRecord(peer_id=f"Qm{c}000000000", role="volunteer", digest="ab" * 32)
        for c in "AB"
    }
    windows = {}
    for together in (False, True):
        node = _Node()
        node.records.peers = lambda: records  # type: ignore[method-assign]
        transport = HivemindTransport(
            node,  # type: ignore[arg-type]
            _Recording,  # type: ignore[arg-type]
            "run_global",
            started_together=together,
        )
        with pytest.raises(AveragingFailed):
            transport.exchange({}, MemberMeta(PEER, 0, "ab" * 32, 1.0))
        windows[together] = [(a["window"], a["expected"]) for a in transport.averager.asked]
    # matchmaking_time 1.0: apart, round one waits two windows and closes on no count
    assert windows == {False: [(2.0, 0)], True: [(None, 3)]}
    # a peer that withheld its contribution from us is not waited for: the group closes once
    # the others are in (it may still come, and then gets the short reveal wait)
    transport.averager.asked.clear()
    transport.averager.suspects = {"QmB": 0}  # B announced round 0 and we form round 1
    with pytest.raises(AveragingFailed):
        transport.exchange({}, MemberMeta(PEER, 1, "ab" * 32, 1.0))
    assert [a["expected"] for a in transport.averager.asked] == [2]


def test_only_a_vouched_state_ahead_cancels_our_matchmaking() -> None:
    # an announcement of a higher round with nothing behind it used to cancel every honest
    # member's matchmaking ("moved on"); now it takes a quorum of valid votes
    from swarmtune.node.engine.certify import round_body
    from swarmtune.node.engine.state import GroupState
    from swarmtune.protocols.certificates import sign_body
    from swarmtune.protocols.identity import Identity
    from swarmtune.protocols.records import VoteRecord

    ids = [Identity.generate() for _ in range(3)]
    ahead = GroupState(9, {"w": torch.ones(2)})
    body = round_body("run", "ab" * 32, ahead, [(i.peer_id, "", 1.0) for i in ids])

    def record(i: int, vote: bool, forged: bool = False) -> PeerRecord:
        signed = sign_body(ids[i if not forged else 0], body, ids[i].peer_id)
        return PeerRecord(
            peer_id=ids[i].peer_id,
            role="volunteer",
            round=9,
            digest=ahead.digest(),
            key=signed.key,
            vote=VoteRecord(body=body.sha256(), sig=signed.sig) if vote else None,
        )

    node = _Node()
    transport = HivemindTransport(node, _Averager, "run_global")  # type: ignore[arg-type]
    for records, moved in [
        ([record(0, vote=False)], False),  # announced, unvouched
        ([record(0, vote=True)], False),  # its own word only
        ([record(0, vote=True), record(1, vote=True, forged=True)], False),  # a key not its own
        ([record(0, vote=True), record(1, vote=True)], True),  # two of four: a quorum
    ]:
        node.records.peers = lambda records=records: {r.peer_id: r for r in records}  # type: ignore[misc]
        assert transport._moved_on(3, transport._members()) is moved
    assert not transport._moved_on(9, transport._members())  # not past our own round


def test_an_announcement_adds_to_the_roles_record_what_it_announces() -> None:
    role = PeerRecord(peer_id=PEER, role="volunteer", task="builtin:capitals", ticket="st1.x")
    node = _Node(role)
    offered: list[tuple[int, int]] = []

    def offers(state: GroupState, cluster: int) -> dict[str, AdapterOffer]:
        offered.append((state.round, cluster))
        return {"global": AdapterOffer(round=state.round, sha256="ab" * 32, size=10)}

    transport = HivemindTransport(node, _Averager, "run_global", offers=offers)  # type: ignore[arg-type]
    node.blobs = BlobServer(None)  # type: ignore[attr-defined,arg-type]  # serves nothing here
    state = GroupState(3, {"w": torch.ones(2)})
    transport.announce_state(state)
    stored = node.stored[-1]
    assert (stored.round, stored.digest, stored.vote) == (3, state.digest(), None)
    assert stored.adapters["global"].round == 3 and offered == [(3, -1)]
    # the role's own fields stay as the role set them
    assert (stored.task, stored.ticket, stored.role) == ("builtin:capitals", "st1.x", "volunteer")


def test_a_full_group_marks_nobody_and_no_shows_are_forgotten_once_their_record_changes() -> None:
    """Review of the no-show rule: a group that closed on its head count (a peer we did not
    expect took the place of one we did) waited out no window, so the one left out is not a
    no-show; and the rule forgets peers whose record changed or expired, so throwaway
    identities do not pile up in it."""
    from swarmtune.protocols.group import MemberMeta

    digest = "ab" * 32
    records, transport = _forming(digest, "QmA", "QmB", "QmC")
    meta = MemberMeta(PEER, 4, digest, 1.0)
    transport.averager.came = ["QmA", "QmB", "QmNew"]  # 4 of the 4 we expected, C left out
    transport.exchange({}, meta)
    assert transport.no_shows == {}
    transport.averager.came = ["QmA", "QmB"]  # C does not come: the group waited its window
    transport.exchange({}, meta)
    assert set(transport.no_shows) == {"QmC"}
    del records["QmC"]  # its record expired
    transport.exchange({}, meta)
    assert transport.no_shows == {}
