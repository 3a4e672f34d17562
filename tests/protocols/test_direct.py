"""Direct TCP transfers of large blobs: the ticket on the p2p stream, the bytes beside it, and
the fall back to the stream whenever the direct path fails or lies."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hivemind.p2p import P2P

from swarmtune.protocols import direct as direct_module
from swarmtune.protocols.direct import (
    DIRECT_MIN,
    MAX_TOKENS,
    TOKEN_BYTES,
    DirectError,
    DirectServer,
    dial_host,
    fetch_direct,
    parse_offer,
)
from swarmtune.protocols.runner import LoopThread
from swarmtune.protocols.transfer import BlobServer, fetch_blob

pytestmark = pytest.mark.p2pd  # starts hivemind's p2p daemon (make test-fast skips these)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the direct path alone ------------------------------------------------------------------


@pytest.fixture
def direct() -> Iterator[DirectServer]:
    server = DirectServer("127.0.0.1")
    yield server
    server.close()


def test_a_ticket_serves_its_bytes_once(direct: DirectServer) -> None:
    data = os.urandom(3 << 20)
    port, token = parse_offer(direct.offer(data)) or (0, b"")
    assert port == direct.port
    assert fetch_direct("127.0.0.1", port, token, len(data), sha(data), 10) == data
    assert direct.bytes_sent == len(data)
    with pytest.raises(DirectError, match="closed after 0"):  # used up
        fetch_direct("127.0.0.1", port, token, len(data), sha(data), 10)


def test_an_unknown_token_gets_nothing(direct: DirectServer) -> None:
    direct.offer(b"secret" * 1000)
    with pytest.raises(DirectError, match="closed after 0"):
        fetch_direct("127.0.0.1", direct.port, os.urandom(TOKEN_BYTES), 6000, sha(b""), 10)
    assert direct.bytes_sent == 0


def test_bytes_that_do_not_hash_to_the_declared_sha_are_refused(direct: DirectServer) -> None:
    data = os.urandom(1 << 16)
    _, token = parse_offer(direct.offer(data)) or (0, b"")
    with pytest.raises(DirectError, match="do not hash"):
        fetch_direct("127.0.0.1", direct.port, token, len(data), sha(b"other"), 10)


def test_a_declared_size_other_than_what_is_sent_is_refused(direct: DirectServer) -> None:
    data = os.urandom(1 << 16)
    for size, problem in ((len(data) + 1, "closed after"), (len(data) - 1, "more than")):
        _, token = parse_offer(direct.offer(data)) or (0, b"")
        with pytest.raises(DirectError, match=problem):
            fetch_direct("127.0.0.1", direct.port, token, size, sha(data[:size]), 10)


def test_a_closed_listener_is_a_direct_error() -> None:
    server = DirectServer("127.0.0.1")
    port = server.port
    server.close()
    with pytest.raises(DirectError, match="127.0.0.1"):
        fetch_direct("127.0.0.1", port, os.urandom(TOKEN_BYTES), 10, sha(b""), 5)


@pytest.mark.timeout(30)
def test_a_silent_sender_fails_after_the_idle_timeout_not_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(direct_module, "IDLE_TIMEOUT", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never sends
        port = silent.getsockname()[1]
        with pytest.raises(DirectError, match="TimeoutError"):
            fetch_direct("127.0.0.1", port, os.urandom(TOKEN_BYTES), 1 << 20, sha(b""), 600)


def test_outstanding_tickets_are_bounded_and_forgotten_on_close() -> None:
    server = DirectServer("127.0.0.1")
    tickets = [server.offer(b"x") for _ in range(MAX_TOKENS)]
    assert all(t is not None for t in tickets)
    assert server.offer(b"x") is None  # over the bound: the request is streamed instead
    server.close()
    assert server.offer(b"x") is None
    _, token = parse_offer(tickets[0]) or (0, b"")
    assert token and not server._tokens  # noqa: SLF001


def test_idle_connections_hold_a_bounded_number_of_slots_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(direct_module, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(direct_module, "CONNECT_TIMEOUT", 3.0)
    server = DirectServer("127.0.0.1")
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        time.sleep(0.2)  # both are being served (waiting for their tokens)
        with socket.create_connection(("127.0.0.1", server.port)) as third:
            # closed at once (no slot left), not after the 3 s a token may take
            third.settimeout(1.5)
            assert third.recv(1) == b""
        data = os.urandom(1 << 16)
        _, token = parse_offer(server.offer(data)) or (0, b"")
        deadline = time.monotonic() + 10  # the idle ones are dropped after CONNECT_TIMEOUT
        while True:
            try:
                got = fetch_direct("127.0.0.1", server.port, token, len(data), sha(data), 5)
                break
            except DirectError:
                assert time.monotonic() < deadline
                _, token = parse_offer(server.offer(data)) or (0, b"")
                time.sleep(0.2)
        assert got == data
        for conn in idle:
            conn.close()
    finally:
        server.close()


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"port": 22, "token": "00" * TOKEN_BYTES},
        [],
        {"port": 0, "token": "00" * TOKEN_BYTES},
        {"port": 70000, "token": "00" * TOKEN_BYTES},
        {"port": True, "token": "00" * TOKEN_BYTES},
        {"port": 80, "token": "00" * (TOKEN_BYTES - 1)},
        {"port": 80, "token": "zz" * TOKEN_BYTES},
        {"port": 80, "token": 5},
    ],
)
def test_malformed_offers_are_none(raw: object) -> None:
    assert parse_offer(raw) is None


def test_dial_host_takes_the_first_direct_ipv4_tcp_address() -> None:
    relayed = "/ip4/10.0.0.1/tcp/4000/p2p/QmRelay/p2p-circuit"
    assert dial_host([relayed, "/ip6/::1/tcp/4000", "/ip4/192.168.1.7/tcp/4001"]) == "192.168.1.7"
    assert dial_host([relayed, "/ip4/1.2.3.4/udp/9/quic"]) is None
    assert dial_host([]) is None


# --- through the blob protocol, on real p2p daemons -----------------------------------------


@dataclass
class Pair:
    loop: LoopThread
    server_p2p: P2P
    client_p2p: P2P
    server: BlobServer

    def fetch(self, name: str, data: bytes, direct: bool = True) -> tuple[bytes, dict]:
        stats: dict[str, float] = {}
        fetch = fetch_blob(
            self.client_p2p,
            self.server_p2p.peer_id,
            name,
            expected_sha256=sha(data),
            stats=stats,
            direct=direct,
        )
        return self.loop.run(fetch, timeout=60), stats


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    loop = LoopThread()

    async def start() -> Pair:
        server_p2p = await P2P.create(host_maddrs=LOOPBACK)
        maddrs = await server_p2p.get_visible_maddrs()
        client_p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
        server = BlobServer(server_p2p)
        await server.start()
        return Pair(loop, server_p2p, client_p2p, server)

    pair = loop.run(start(), timeout=60)
    yield pair
    if pair.server.direct is not None:
        pair.server.direct.close()
    loop.run(pair.server.stop(), timeout=10)
    for p2p in (pair.client_p2p, pair.server_p2p):
        loop.run(p2p.shutdown(), timeout=10)
    loop.shutdown()


@pytest.fixture
def listening(pair: Pair) -> Iterator[DirectServer]:
    pair.server.direct = DirectServer("127.0.0.1")
    yield pair.server.direct
    pair.server.direct.close()
    pair.server.direct = None


def test_a_large_blob_comes_over_the_direct_connection(pair: Pair, listening: DirectServer) -> None:
    data = os.urandom(4 << 20)
    pair.server.publish("big", data)
    on_stream = pair.server.bytes_sent
    received, stats = pair.fetch("big", data)
    assert received == data and stats["direct"] == 1
    assert listening.bytes_sent == len(data)
    assert pair.server.bytes_sent - on_stream < 1024  # only the header went through p2pd


def test_small_blobs_and_plain_clients_stay_on_the_stream(
    pair: Pair, listening: DirectServer
) -> None:
    small, large = os.urandom(DIRECT_MIN - 1), os.urandom(DIRECT_MIN)
    pair.server.publish("small", small)
    pair.server.publish("large", large)
    received, stats = pair.fetch("small", small)
    assert received == small and stats["direct"] == 0
    received, stats = pair.fetch("large", large, direct=False)
    assert received == large and stats["direct"] == 0
    assert listening.bytes_sent == 0


def test_a_server_without_a_listener_streams_as_before(pair: Pair) -> None:
    data = os.urandom(2 << 20)
    pair.server.publish("big", data)
    received, stats = pair.fetch("big", data)
    assert received == data and stats["direct"] == 0


def test_an_unreachable_listener_falls_back_to_the_stream(
    pair: Pair, listening: DirectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as gone:  # a port nobody listens on any more
        dead = gone.getsockname()[1]
    ticket = {"port": dead, "token": "00" * TOKEN_BYTES}  # (a firewall, a NAT in between)
    monkeypatch.setattr(listening, "offer", lambda _data: ticket)
    data = os.urandom(2 << 20)
    pair.server.publish("big", data)
    received, stats = pair.fetch("big", data)
    assert received == data and stats["direct"] == -1


def test_altered_direct_bytes_are_refused_and_the_stream_serves_the_real_ones(
    pair: Pair, listening: DirectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 << 20)
    pair.server.publish("big", data)
    offer = listening.offer
    altered = bytes([data[0] ^ 1]) + data[1:]  # what an on-path attacker could substitute
    monkeypatch.setattr(listening, "offer", lambda _data: offer(altered))
    received, stats = pair.fetch("big", data)
    assert received == data and stats["direct"] == -1
    assert listening.bytes_sent == len(altered)  # it was sent, and refused
