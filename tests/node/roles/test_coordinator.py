"""The coordinator's serve loop: a signal ends it promptly; a crash is not turned into exit 0."""

from __future__ import annotations

import threading
import time

import pytest

from swarmtune.node.roles.coordinator import serve_until_stopped


class _Blocked:
    """A coordinator whose tick hangs on a slow peer."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def serve(self) -> None:
        time.sleep(60)


class _Crashing:
    def __init__(self) -> None:
        self.stop = threading.Event()

    def serve(self) -> None:
        raise KeyError("a bug in a tick")


def test_a_stop_ends_serving_within_the_grace_even_if_a_tick_hangs() -> None:
    coordinator = _Blocked()
    threading.Timer(0.2, coordinator.stop.set).start()
    started = time.monotonic()
    serve_until_stopped(coordinator, grace=0.5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5


def test_a_crash_in_the_serve_loop_reaches_the_caller() -> None:
    with pytest.raises(KeyError, match="a bug in a tick"):
        serve_until_stopped(_Crashing(), grace=0.5)  # type: ignore[arg-type]


class _Node:
    peer_id = "QmCoordinatorBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"

    def __init__(self) -> None:
        self.stored: list[tuple[str, dict]] = []
        self.records = self  # the record store's one call, recorded here

    def store_owned(self, key: str, value: dict, ttl: float) -> None:
        self.stored.append((key, value))


def test_revocations_are_published_when_the_list_changes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from swarmtune.node.roles.admit import revoke
    from swarmtune.node.roles.coordinator import Coordinator
    from swarmtune.protocols.records import RevocationRecord
    from tests.node.roles.test_admit import PEER, _coordinator

    manifest = _coordinator(tmp_path)
    node = _Node()
    coordinator = Coordinator(node, manifest, tmp_path)  # type: ignore[arg-type]
    coordinator.publish_revocations()
    coordinator.publish_revocations()  # unchanged: not stored again
    assert [RevocationRecord.model_validate(v).revoked for _, v in node.stored] == [[]]
    revoke(tmp_path, PEER)
    coordinator.publish_revocations()
    key, value = node.stored[-1]
    assert key == "token-run_revoked" and RevocationRecord.model_validate(value).revoked == [PEER]


def test_the_coordinator_says_who_can_dial_each_address() -> None:
    from swarmtune.node.roles.coordinator import address_lines

    peer = "/p2p/12D3KooWCe2jZ4NuUHKqfCDaD21NQqJAuCSs7KgW5aNqJkPhwt4t"
    local = address_lines([f"/ip4/127.0.0.1/tcp/31337{peer}"])
    assert "this machine only" in local and "--announce" not in local
    home = address_lines([f"/ip4/192.168.1.7/tcp/31337{peer}", f"/ip4/127.0.0.1/tcp/31337{peer}"])
    assert "same network" in home and "--announce PUBLIC_IP" in home  # behind NAT: say how
    both = address_lines([f"/ip4/81.2.69.160/tcp/31337{peer}", f"/ip4/10.0.0.5/tcp/31337{peer}"])
    lines = both.splitlines()
    assert "81.2.69.160" in lines[1] and "public" in lines[1]
    assert "10.0.0.5" in lines[2] and "same network" in lines[2]
    assert "--announce" not in both
