"""Reachability (protocols/reach.py): the circuit address p2pd parses, the p2pd flag, the
dial-back probe and blob passing-on, over real p2pd daemons on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarmtune.protocols.hivemind_private import p2pd_args
from swarmtune.protocols.identity import Identity
from swarmtune.protocols.reach import (
    CircuitAddr,
    DialBackServer,
    ask_dial_back,
    observed_ip,
)
from swarmtune.protocols.records import PeerRecord
from swarmtune.protocols.routing import (
    NOT_RELAYED_HERE,
    RELAY_BUSY,
    TRUNCATED_RETRIES,
    BlobRouter,
    worth_retrying,
)
from swarmtune.protocols.runner import LoopThread
from swarmtune.protocols.swarm import SwarmError, SwarmNode
from swarmtune.protocols.transfer import (
    CHUNK_SIZE,
    BlobServer,
    TransferError,
    fetch_blob,
    pass_on_blob,
    refuse,
)

pytestmark = pytest.mark.p2pd  # starts hivemind's p2p daemon (make test-fast skips these)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
PEER = "12D3KooWJrfJBNRJJVr3VX9RXmSMuVxxtppw3jPFZuUe3dQEiUXH"
# that peer id's identity multihash (0x00, length 0x24, protobuf public key), from its base58
PEER_MULTIHASH = "002408011220864fb5fb2ebc29ba3889ec04af43261be369aa905353a3170b429c0e3fc35e40"


def test_circuit_address_is_the_binary_multiaddr_go_expects() -> None:
    addr = CircuitAddr(f"/ip4/10.77.1.1/tcp/7000/p2p/{PEER}")
    expected = "".join(
        [
            "04" + "0a4d0101",  # ip4 10.77.1.1
            "06" + "1b58",  # tcp 7000
            "a503" + "26" + PEER_MULTIHASH,  # p2p (421), 38 bytes of multihash, not a CID
            "a202",  # p2p-circuit (290), no value
        ]
    )
    assert addr.to_bytes().hex() == expected
    assert str(addr) == f"/ip4/10.77.1.1/tcp/7000/p2p/{PEER}/p2p-circuit"
    with pytest.raises(ValueError, match="/p2p/"):
        CircuitAddr("/ip4/10.77.1.1/tcp/7000")


def test_static_relays_turn_background_discovery_off() -> None:
    seen: list[dict[str, Any]] = []
    build = p2pd_args(lambda *args, **kwargs: seen.append(kwargs) or [])
    build("p2pd", autoRelay=True, trustedRelays="/ip4/1.2.3.4/tcp/1/p2p/x")
    build("p2pd", autoRelay=True)  # discovery is then the only source of relays: kept
    build("p2pd", autoRelay=False, trustedRelays="/ip4/1.2.3.4/tcp/1/p2p/x")
    assert seen[0]["relayDiscovery"] is False
    assert "relayDiscovery" not in seen[1] and "relayDiscovery" not in seen[2]


def test_observed_ip_takes_direct_connections_only() -> None:
    relayed = f"/ip4/10.77.1.1/tcp/7000/p2p/{PEER}/p2p-circuit"
    assert observed_ip([relayed, "/ip4/10.77.2.2/tcp/4100"]) == "10.77.2.2"
    assert observed_ip([relayed]) is None
    assert observed_ip(["/ip6/::1/tcp/4100"]) is None


@dataclass
class Pair:
    loop: LoopThread
    coordinator: P2P
    volunteer: P2P
    bare: P2P  # a peer with no dial-back service


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    loop = LoopThread()

    async def start() -> Pair:
        coordinator = await P2P.create(host_maddrs=LOOPBACK)
        bare = await P2P.create(host_maddrs=LOOPBACK)
        peers = [*await coordinator.get_visible_maddrs(), *await bare.get_visible_maddrs()]
        volunteer = await P2P.create(host_maddrs=LOOPBACK, initial_peers=peers)
        await DialBackServer(coordinator).start()
        return Pair(loop, coordinator, volunteer, bare)

    started = loop.run(start(), timeout=60)
    yield started
    for p2p in (started.volunteer, started.coordinator, started.bare):
        loop.run(p2p.shutdown(), timeout=10)
    loop.shutdown()


def test_dial_back_reaches_a_listening_port(pair: Pair) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        ok, where = pair.loop.run(
            ask_dial_back(pair.volunteer, pair.coordinator.peer_id, port), timeout=30
        )
    assert (ok, where) == (True, f"127.0.0.1:{port}")


def test_dial_back_of_a_closed_port_says_unreachable(pair: Pair) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    ok, why = pair.loop.run(
        ask_dial_back(pair.volunteer, pair.coordinator.peer_id, port), timeout=30
    )
    assert ok is False and f"127.0.0.1:{port}" in why


def test_dial_back_refuses_a_bad_port_and_a_peer_without_it_does_not_answer(pair: Pair) -> None:
    ok, why = pair.loop.run(ask_dial_back(pair.volunteer, pair.coordinator.peer_id, 0), timeout=30)
    assert ok is False and "bad port" in why
    ok, why = pair.loop.run(ask_dial_back(pair.volunteer, pair.bare.peer_id, 4100), timeout=30)
    assert ok is None and "no dial-back" in why


def test_a_relay_passes_on_a_blob_and_its_refusals(pair: Pair) -> None:
    """`via/PEER/NAME` at a relay: PEER's blob, passed on frame by frame; PEER's refusal (an
    unknown blob stays recognisable for the retry) and the relay's own reach the asking side."""
    blob = os.urandom(3 * CHUNK_SIZE + 5)  # several chunks pass through the relay

    async def run() -> tuple[bytes, str, str]:
        served = BlobServer(pair.volunteer)  # the relayed peer
        await served.start()
        served.publish("contribution:x:3", blob)

        async def proxy(peer: str, name: str, writer: asyncio.StreamWriter) -> int:
            if peer != pair.volunteer.peer_id.to_base58():
                return await refuse(writer, f"{peer} {NOT_RELAYED_HERE}")
            return await pass_on_blob(
                pair.coordinator, pair.volunteer.peer_id, name, writer, 1 << 30
            )

        relay = BlobServer(pair.coordinator, proxy=proxy)
        await relay.start()
        addrs = [  # without /p2p/ID, which hivemind's multiaddr would encode as a CID
            Multiaddr(str(m).split("/p2p/")[0]) for m in await pair.coordinator.get_visible_maddrs()
        ]
        await pair.bare._client.connect(pair.coordinator.peer_id, addrs)  # noqa: SLF001
        peer = pair.volunteer.peer_id.to_base58()
        errors = []
        try:
            got = await fetch_blob(
                pair.bare,
                pair.coordinator.peer_id,
                f"via/{peer}/contribution:x:3",
                expected_sha256=hashlib.sha256(blob).hexdigest(),
            )
            for name in (f"via/{peer}/contribution:x:4", "via/QmSomeoneElse/contribution:x:3"):
                try:
                    await fetch_blob(pair.bare, pair.coordinator.peer_id, name)
                except TransferError as exc:
                    errors.append(str(exc))
            return got, *errors
        finally:
            await relay.stop()
            await served.stop()

    got, unknown, not_relayed = pair.loop.run(run(), timeout=60)
    assert got == blob
    assert "unknown blob 'contribution:x:4'" in unknown
    assert "not a peer relayed here" in not_relayed


def test_a_relay_passes_on_only_for_peers_connected_to_it_directly() -> None:
    """Whether a relay passes on for PEER is a fact of its own p2p daemon (a direct connection
    from PEER), not of any record."""
    direct_peer = "QmNq9XgSP4R4cSBCXDBbjV3nv6mLUJD2yNNJ8ckiSQzb9Z"
    circuit_peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"

    class Daemon:
        async def list_peers(self) -> list[SimpleNamespace]:
            return [
                SimpleNamespace(
                    peer_id=PeerID.from_base58(direct_peer), addrs=["/ip4/10.77.1.2/tcp/4100"]
                ),
                SimpleNamespace(
                    peer_id=PeerID.from_base58(circuit_peer),
                    addrs=[f"/ip4/10.77.1.1/tcp/7000/p2p/{PEER}/p2p-circuit"],
                ),
            ]

    # a record saying that circuit_peer is relayed through us changes nothing
    claims = {circuit_peer: PeerRecord(peer_id=circuit_peer, role="volunteer", reach="relay",
                                       relay=f"/ip4/10.77.1.1/tcp/7000/p2p/{PEER}")}  # fmt: skip
    router = BlobRouter(Daemon(), None, PEER, lambda age: claims, [], relay_service=True)  # type: ignore[arg-type]
    router.learn()
    assert router.routes(circuit_peer) == [""]  # the record is read: we would ask it directly
    for peer in (circuit_peer, "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5M", "not-an-id"):
        answer = _Captured()
        asyncio.run(router._pass_on(peer, "contribution:x:1", answer))  # type: ignore[arg-type]  # noqa: SLF001
        header = json.loads(bytes(answer.data[4:]))
        assert header["ok"] is False and "not a peer relayed here" in header["error"]


def test_a_forged_record_cannot_route_a_peer_s_blobs_away_for_good() -> None:
    """Records are self-reported: the relay a record names is tried first, then every other
    relay we know, then the peer itself."""
    victim, attacker, through_us, direct, ours = (Identity.generate().peer_id for _ in range(5))
    coordinator = f"/ip4/10.77.1.1/tcp/1/p2p/{ours}"  # our initial peer, which relays
    records = {
        attacker: PeerRecord(peer_id=attacker, role="volunteer", serves_relay=True),
        victim: PeerRecord(peer_id=victim, role="volunteer", reach="relay",
                           relay=f"/ip4/192.0.2.9/tcp/1/p2p/{attacker}"),
        through_us: PeerRecord(peer_id=through_us, role="volunteer", reach="relay",
                               relay=f"/ip4/192.0.2.9/tcp/1/p2p/{PEER}"),
    }  # fmt: skip
    router = BlobRouter(None, None, PEER, lambda age: records, [coordinator])  # type: ignore[arg-type]
    router.learn()
    assert router.routes(victim) == [f"/p2p/{attacker}", coordinator, ""]
    assert router.routes(direct) == ["", coordinator, f"/p2p/{attacker}"]
    assert router.routes(through_us) == [""]


class _Captured:
    """What a stream writer was given (the refusal is written before any network use)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def test_a_volunteer_reaches_relayed_peers_only_through_relays_it_knows() -> None:
    """A record cannot make every volunteer dial an address it chose: the relay must be one
    of our initial peers, and we dial the address we know for it."""
    coordinator = "QmNq9XgSP4R4cSBCXDBbjV3nv6mLUJD2yNNJ8ckiSQzb9Z"
    ours = f"/ip4/10.77.1.1/tcp/31337/p2p/{coordinator}"
    records = {
        "QmA": PeerRecord(peer_id="QmA0000000", role="volunteer", reach="relay",
                          relay=f"/ip4/192.0.2.66/tcp/80/p2p/{coordinator}"),
        "QmB": PeerRecord(peer_id="QmB0000000", role="volunteer", reach="relay",
                          relay="/ip4/192.0.2.66/tcp/80/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"),
    }  # fmt: skip
    router = BlobRouter(None, None, PEER, lambda age: records, [ours])  # type: ignore[arg-type]
    router.learn()
    assert router.routes("QmA") == [ours, ""]  # at the address we know, then the peer itself
    assert router.routes("QmB") == ["", ours]  # its relay is none we know: not dialed


def test_a_public_volunteer_that_serves_as_relay_is_used_by_peer_id_only() -> None:
    """A live direct peer whose record says it relays is a relay for others, dialed by peer
    id (p2pd finds it); a relayed peer claiming to relay is not."""
    public = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    nated = "QmNq9XgSP4R4cSBCXDBbjV3nv6mLUJD2yNNJ8ckiSQzb9Z"
    records = {
        public: PeerRecord(peer_id=public, role="volunteer", reach="direct", serves_relay=True),
        nated: PeerRecord(peer_id=nated, role="volunteer", reach="relay", serves_relay=True,
                          relay=f"/ip4/192.0.2.1/tcp/5/p2p/{public}"),
        "QmBehindNated": PeerRecord(peer_id="QmBehindNated", role="volunteer", reach="relay",
                                    relay=f"/ip4/192.0.2.1/tcp/5/p2p/{nated}"),
    }  # fmt: skip
    router = BlobRouter(None, None, PEER, lambda age: records, [])  # type: ignore[arg-type]
    router.learn()
    # `nated` says it relays, but it is relayed itself: QmBehindNated cannot be reached that way
    assert router.routes(nated) == [f"/p2p/{public}", ""]
    assert router.routes("QmBehindNated") == ["", f"/p2p/{public}"]
    by_id = CircuitAddr(f"/p2p/{PEER}")
    assert by_id.to_bytes().hex() == "a503" + "26" + PEER_MULTIHASH + "a202"


def test_relay_addresses_a_record_may_name() -> None:
    for good in (f"/ip4/10.77.1.1/tcp/7000/p2p/{PEER}", f"/dns4/coord.example.org/tcp/31337/p2p/{PEER}",
                 f"/ip6/::1/tcp/4100/p2p/{PEER}", ""):  # fmt: skip
        PeerRecord(peer_id="QmVolunteer", role="volunteer", relay=good)
    for bad in (f"/ip4/10.77.1.1/udp/7000/p2p/{PEER}", "/ip4/10.77.1.1/tcp/7000", "http://x"):
        with pytest.raises(ValueError):
            PeerRecord(peer_id="QmVolunteer", role="volunteer", relay=bad)


def test_a_relay_address_that_is_not_one_is_one_clear_error() -> None:
    with pytest.raises(SwarmError, match="cannot be a relay"):
        SwarmNode(initial_peers=["/ip4/10.77.1.1/tcp/7000"], reach="auto")


def test_a_fetch_falls_back_to_the_next_route_and_keeps_the_retryable_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_fetch_by_routes asks each route in turn: a refusing relay is not the end; when all
    fail, an "unknown blob" error (which fetch_many retries) wins over other failures."""
    import swarmtune.protocols.routing as routing_module

    asked: list[tuple[str, str]] = []

    async def fake_fetch(p2p: object, peer: PeerID, name: str, **_: object) -> bytes:
        asked.append((peer.to_base58(), name))
        if peer.to_base58() == attacker:
            raise TransferError("peer refused: withheld")
        if name.startswith("via/"):
            return b"the blob"
        raise TransferError("peer refused: unknown blob 'x'")

    attacker, coordinator = PEER, "QmNq9XgSP4R4cSBCXDBbjV3nv6mLUJD2yNNJ8ckiSQzb9Z"
    victim = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    monkeypatch.setattr(routing_module, "fetch_blob", fake_fetch)
    node = BlobRouter(None, None, PEER, lambda age: {}, [])  # type: ignore[arg-type]
    routes = [f"/p2p/{attacker}", f"/ip4/10.77.1.1/tcp/1/p2p/{coordinator}", ""]
    got = asyncio.run(node._fetch_by_routes(routes, victim, "x", None, 10.0, 1 << 20, None))  # noqa: SLF001
    assert got == b"the blob"
    assert asked == [(attacker, f"via/{victim}/x"), (coordinator, f"via/{victim}/x")]

    asked.clear()
    with pytest.raises(TransferError, match="unknown blob"):  # the peer itself, then a refusal
        asyncio.run(
            node._fetch_by_routes(["", f"/p2p/{attacker}"], victim, "x", None, 10.0, 1 << 20, None)
        )  # noqa: SLF001
    assert asked == [(victim, "x"), (attacker, f"via/{victim}/x")]


def test_a_suspected_withholder_gets_its_short_wait_and_a_not_served_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fetch_many asks again for a blob its peer does not serve yet, for the reveal wait, or for
    the shorter wait the caller gives a peer that withheld before; one still unserved at the end
    is NotServed (withholding), a network failure is not."""
    import swarmtune.protocols.routing as routing_module
    from swarmtune.protocols.transfer import NotServed

    asked: dict[str, int] = {}

    async def fake_fetch(peer: str, name: str, *_: object, **__: object) -> bytes:
        asked[peer] = asked.get(peer, 0) + 1
        if peer == "QmServes":
            return b"blob"
        if peer == "QmUnreachable":
            raise TransferError("peer unreachable or not serving /swarmtune/blob")
        if peer == "QmNoRelay":  # a route peer that relays nothing, asked for the via name
            raise TransferError(f"peer refused: unknown blob 'via/{peer}/contribution:run:4'")
        raise TransferError("peer refused: unknown blob 'contribution:run:4'")

    monkeypatch.setattr(routing_module, "UNKNOWN_RETRY_S", 0.01)
    monkeypatch.setattr(routing_module, "REVEAL_WAIT_S", 0.3)
    loop = LoopThread("test-fetch-many")
    try:
        router = BlobRouter(None, loop, PEER, lambda age: {}, [])  # type: ignore[arg-type]
        monkeypatch.setattr(router, "_fetch", fake_fetch)
        wanted = {p: ("contribution:run:4", "ab" * 32, 4) for p in
                  ("QmServes", "QmUnreachable", "QmWithholds", "QmSuspect", "QmNoRelay")}  # fmt: skip
        got = router.fetch_many(wanted, timeout=10.0, waits={"QmSuspect": 0.0})
    finally:
        loop.shutdown()
    assert got["QmServes"] == b"blob"
    assert type(got["QmUnreachable"]) is TransferError  # not retried, not withholding
    assert type(got["QmNoRelay"]) is TransferError  # retried, but not the member's own answer
    assert isinstance(got["QmWithholds"], NotServed) and isinstance(got["QmSuspect"], NotServed)
    # asked until its wait ended, against once: a suspect costs no reveal wait
    assert asked["QmSuspect"] == 1 and asked["QmWithholds"] > 1 and asked["QmUnreachable"] == 1


def test_a_relay_that_refuses_for_a_moment_is_asked_again_and_a_lasting_error_is_not() -> None:
    """Seen in the across-NAT test: a relay refused to pass on a relayed member's contribution
    once (its message was cut in the log) and the member was left out of a round, which split
    it from the others. The refusals a moment can change are asked again within the reveal
    wait, like an unknown blob; a truncated stream a few times; anything else not at all."""
    relayed = f"fetch of blob 'via/QmV/contribution:r_global:3' from QmR: peer refused: QmV {NOT_RELAYED_HERE}"
    assert worth_retrying(relayed, 0)
    assert worth_retrying(f"fetch of blob 'x' from QmR: peer refused: {RELAY_BUSY}", 0)
    assert worth_retrying("fetch of blob 'x' from QmV: peer refused: unknown blob 'x'", 0)
    assert worth_retrying("stream ended early", TRUNCATED_RETRIES)
    assert not worth_retrying("stream ended early", TRUNCATED_RETRIES + 1)
    assert not worth_retrying("fetch of blob 'x' from QmV: sha256 mismatch", 0)
    assert not worth_retrying("fetch of blob 'x' from QmV: timed out after 5 s", 0)
