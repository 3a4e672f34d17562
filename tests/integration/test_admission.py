"""Token admission on real peers (127.0.0.1): an unadmitted peer never averages with anyone,
its attempts are refused and named, and a revocation published by the coordinator keeps a
member out from the next round on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from swarmtune.node.engine.round import select_contributions
from swarmtune.node.engine.swarm_transport import HivemindTransport
from swarmtune.node.engine.transport import GroupResult, MemberMeta
from swarmtune.node.roles.admit import read_revocations
from swarmtune.protocols.admission import Gate, issue_ticket
from swarmtune.protocols.averaging import GroupAverager
from swarmtune.protocols.records import PeerRecord, RevocationRecord, revoked_key
from swarmtune.protocols.swarm import SwarmNode, load_or_create_key
from tests.integration.parallel import run_members

pytestmark = pytest.mark.slow
RUN = "admit-test"
SHAPES = {"layer.lora_A": (4, 32), "layer.lora_B": (32, 4)}


def _transport(node: SwarmNode, gate: Gate, ticket: str, revoked) -> HivemindTransport:  # type: ignore[no-untyped-def]
    template = {k: torch.zeros(s) for k, s in SHAPES.items()}

    def make(prefix: str) -> GroupAverager:
        return GroupAverager(
            node.dht, node.routes, prefix, template, matchmaking_time=2.0, gate=gate
        )

    node.records.set_record(
        PeerRecord(peer_id=node.peer_id, role="volunteer", ticket=ticket), store=False
    )
    transport = HivemindTransport(node, make, f"{RUN}_global", ticket=ticket, revoked=revoked)
    # no heartbeat records here: tell it what they would say (the three admitted members take
    # part, less any it refuses: the revoked one), so a group closes once they are in instead
    # of waiting out a doubled first window
    transport.first_window = None
    transport.expected_peers = lambda refused, *_: {f"peer{i}" for i in range(3 - len(refused))}  # type: ignore[method-assign]
    return transport


def _exchange_all(transports: list[HivemindTransport], round_: int) -> list:
    gen = torch.Generator().manual_seed(round_)
    deltas = [{k: torch.randn(s, generator=gen) for k, s in SHAPES.items()} for _ in transports]

    def work(i: int) -> GroupResult:
        meta = MemberMeta(transports[i].peer, round_, "ab" * 32, 64.0)
        return transports[i].exchange(deltas[i], meta)

    return run_members(work, len(transports))


def test_unadmitted_and_revoked_peers_never_average(tmp_path: Path) -> None:
    coordinator = SwarmNode(initial_peers=[], workdir=tmp_path / "coord", run_id=RUN)
    key = load_or_create_key(tmp_path / "coord" / "records.key")
    nodes = [
        SwarmNode(initial_peers=coordinator.maddrs(), workdir=tmp_path / f"v{i}", run_id=RUN)
        for i in range(4)
    ]
    admitted, stranger = nodes[:3], nodes[3]
    gates = [Gate(coordinator.records.owner_key, RUN) for _ in nodes]

    def revoked_for(node: SwarmNode):  # type: ignore[no-untyped-def]
        return lambda: read_revocations(node, RUN, coordinator.records.owner_key)

    tickets = [issue_ticket(key, RUN, n.peer_id, 3600) for n in admitted]
    # the stranger presents a genuine ticket, but one issued to someone else
    transports = [
        _transport(n, g, t, revoked_for(n))
        for n, g, t in zip(nodes, gates, [*tickets, tickets[0]], strict=True)
    ]
    transports[3].timeout = 5.0  # refused everywhere: it gives up soon after the others
    try:
        names = {n.peer_id: f"v{i}" for i, n in enumerate(nodes)}
        seen_stranger = 0
        for round_ in range(2):
            results = _exchange_all(transports, round_)
            for node, result in zip(admitted, results[:3], strict=True):
                assert isinstance(result, GroupResult), (names[node.peer_id], result)
                assert stranger.peer_id not in result.contributions
                if stranger.peer_id in {m.peer for m in result.members}:
                    seen_stranger += 1
                    assert "not admitted" in result.missing[stranger.peer_id]
                mine = next(m for m in result.members if m.peer == node.peer_id)
                chosen, _ = select_contributions(result, mine)
                assert {m.peer for m in chosen} == {n.peer_id for n in admitted}
        refused = sum(t.refused_joins for t in transports[:3])
        # every attempt of the stranger was refused by an admitted leader or named by members
        assert refused + seen_stranger > 0

        # the coordinator revokes v2; members reread the list before their next exchange
        record = RevocationRecord(version=1, revoked=[admitted[2].peer_id])
        coordinator.records.store_owned(revoked_key(RUN), record.model_dump(), 600)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(
                admitted[2].peer_id in read_revocations(n, RUN, coordinator.records.owner_key)
                for n in admitted[:2]
            ):
                break
            time.sleep(0.5)
        results = _exchange_all(transports[:3], 2)
        for result in results[:2]:
            assert isinstance(result, GroupResult), result
            assert admitted[2].peer_id not in result.contributions
            assert {m.peer for m in result.members} <= {n.peer_id for n in admitted}
    finally:
        for t in transports:
            t.averager.shutdown()
        for n in [*nodes, coordinator]:
            n.shutdown()


@pytest.mark.timeout(300)
def test_address_admission_hands_out_tickets_and_refuses_an_address_past_its_limit(
    tmp_path: Path,
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from swarm_harness import FAST_CONFIG, Swarm

    config = FAST_CONFIG.format(run_id="address-run")
    config += "admission: {policy: address, identities_per_address: 1}\n"
    swarm = Swarm(tmp_path, config_text=config)
    try:
        swarm.start_coordinator()
        swarm.join("v0", "arithmetic", 1)
        deadline = time.monotonic() + 120
        while "admitted by ticket" not in swarm.log("v0"):
            assert time.monotonic() < deadline and swarm.procs["v0"].poll() is None, swarm.log("v0")
            time.sleep(0.2)
        swarm.join("v1", "dates", 1)  # a second identity from the same address (127.0.0.1)
        assert swarm.wait("v1", 120) == 2, swarm.log("v1")
        refusal = [line for line in swarm.log("v1").splitlines() if "no admission ticket" in line]
        assert len(refusal) == 1 and "127.0.0.1 already holds 1 identities" in refusal[0]
        assert "Traceback" not in swarm.log("v1")
        assert swarm.procs["v0"].poll() in (None, 0), swarm.log("v0")  # the first one trains on
    finally:
        swarm.close()
