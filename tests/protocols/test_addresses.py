"""Addresses for other machines: who can dial what, best first, and --announce."""

from __future__ import annotations

import socket

import pytest

from swarmtune.protocols.swarm import (
    SwarmError,
    SwarmNode,
    address_kind,
    announce_multiaddrs,
    rank_maddrs,
)

pytestmark = pytest.mark.p2pd  # starts hivemind's p2p daemon (make test-fast skips these)

PEER = "/p2p/12D3KooWCe2jZ4NuUHKqfCDaD21NQqJAuCSs7KgW5aNqJkPhwt4t"


@pytest.mark.parametrize(
    "ip, kind",
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private network"),
        ("172.16.0.9", "private network"),
        ("192.168.1.20", "private network"),
        ("100.64.3.4", "private network"),  # carrier-grade NAT
        ("169.254.0.5", "private network"),
        ("198.51.100.7", "private network"),  # documentation range: not routed
        ("8.8.8.8", "public"),
        ("81.2.69.160", "public"),
    ],
)
def test_who_can_dial_an_address(ip: str, kind: str) -> None:
    assert address_kind(f"/ip4/{ip}/tcp/31337{PEER}") == kind


def test_public_first_then_private_then_loopback() -> None:
    maddrs = [f"/ip4/{ip}/tcp/1{PEER}" for ip in ("127.0.0.1", "10.0.0.2", "8.8.4.4", "::1")]
    maddrs[3] = f"/ip6/::1/tcp/1{PEER}"
    assert [m.split("/")[2] for m in rank_maddrs(maddrs)] == [
        "8.8.4.4",
        "10.0.0.2",
        "::1",
        "127.0.0.1",
    ]


def test_announce_needs_a_fixed_port_and_ipv4_addresses() -> None:
    assert announce_multiaddrs(["81.2.69.160"], 31337) == ["/ip4/81.2.69.160/tcp/31337"]
    with pytest.raises(SwarmError, match="fixed --port"):
        announce_multiaddrs(["81.2.69.160"], 0)
    with pytest.raises(SwarmError, match="not an IPv4 address"):
        announce_multiaddrs(["example.org"], 31337)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_announced_address_is_what_the_peer_hands_out() -> None:
    # listens on loopback only; the announced documentation address is never dialed here
    port = _free_port()
    node = SwarmNode(initial_peers=[], host="127.0.0.1", port=port, announce=["198.51.100.7"])
    try:
        assert node.maddrs()[0].startswith(f"/ip4/198.51.100.7/tcp/{port}/p2p/{node.peer_id}")
    finally:
        node.shutdown()
