"""HivemindTransport wiring that needs no network: group switches and record updates."""

from __future__ import annotations

from node.engine.swarm_transport import HivemindTransport
from protocols.records import PeerRecord

PEER = "QmTestPeer0000000000"


class _Averager:
    def __init__(self, prefix: str) -> None:
        self.prefix, self.closed, self.matchmaking_time = prefix, False, 1.0
        self.refused_joins = 2

    def shutdown(self) -> None:
        self.closed = True


class _Node:
    peer_id = PEER

    def __init__(self) -> None:
        self.stored: list[PeerRecord] = []

    def set_record(self, record: PeerRecord) -> None:
        self.stored.append(record)


def test_switching_group_withdraws_the_old_groups_state() -> None:
    node = _Node()
    record = PeerRecord(peer_id=PEER, role="volunteer", round=7, digest="ab" * 32)
    transport = HivemindTransport(node, _Averager, "run_global", role_record=record)  # type: ignore[arg-type]
    first = transport.averager
    transport.switch_group("run_cluster3", 3)
    assert first.closed and transport.averager.prefix == "run_cluster3"
    stored = node.stored[-1]
    # our round-7 state is the old group's: announcing it in cluster 3 would outvote its members
    assert stored.cluster == 3 and stored.digest == ""
    assert transport.cluster == 3
    # join requests the closed averager refused still count
    assert transport.refused_joins == 4
