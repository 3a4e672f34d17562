"""Blob transfer over real p2pd daemons on 127.0.0.1: round trips and rejection of bad peers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hivemind.p2p import P2P, PeerID

from swarmtune.protocols.runner import LoopThread
from swarmtune.protocols.transfer import (
    CHUNK_SIZE,
    PROTOCOL,
    BlobServer,
    TransferError,
    fetch_blob,
    pack_files,
    unpack_files,
    write_dir_atomically,
)

pytestmark = pytest.mark.p2pd  # starts hivemind's p2p daemon (make test-fast skips these)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
# A well-formed peer id that no daemon in this test owns.
UNKNOWN_PEER = PeerID.from_base58("QmNq9XgSP4R4cSBCXDBbjV3nv6mLUJD2yNNJ8ckiSQzb9Z")


def frame(payload: bytes) -> bytes:
    """The wire framing, written independently of the module under test."""
    return struct.pack(">I", len(payload)) + payload


def header(size: int, sha256: str) -> bytes:
    return frame(json.dumps({"ok": True, "size": size, "sha256": sha256}).encode())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Swarm:
    loop: LoopThread
    server_p2p: P2P
    client_p2p: P2P
    evil_p2p: P2P
    server: BlobServer
    evil_handler: list[Handler] = field(default_factory=list)

    def fetch(self, name: str, peer: P2P | None = None, **kwargs: object) -> bytes:
        peer_id = (peer or self.server_p2p).peer_id
        return self.loop.run(fetch_blob(self.client_p2p, peer_id, name, **kwargs), timeout=30)

    def serve_evil(self, handler: Handler) -> None:
        self.evil_handler[:] = [handler]


async def _start_swarm(loop: LoopThread) -> Swarm:
    server_p2p = await P2P.create(host_maddrs=LOOPBACK)
    evil_p2p = await P2P.create(host_maddrs=LOOPBACK)
    bootstrap = [*await server_p2p.get_visible_maddrs(), *await evil_p2p.get_visible_maddrs()]
    client_p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=bootstrap)
    server = BlobServer(server_p2p, request_timeout=0.5)
    await server.start()
    swarm = Swarm(loop, server_p2p, client_p2p, evil_p2p, server)

    async def dispatch(_info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            await swarm.evil_handler[0](reader, writer)
        finally:
            writer.close()

    await evil_p2p.add_binary_stream_handler(PROTOCOL, dispatch)
    return swarm


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    swarm = loop.run(_start_swarm(loop), timeout=60)
    yield swarm
    loop.run(swarm.server.stop(), timeout=10)
    for p2p in (swarm.client_p2p, swarm.evil_p2p, swarm.server_p2p):
        loop.run(p2p.shutdown(), timeout=10)
    loop.shutdown()


# --- real server, honest peers -------------------------------------------------------------


def test_round_trip_of_10_mib_exceeds_the_rpc_cap(swarm: Swarm) -> None:
    payload = os.urandom(10 << 20)  # > hivemind's 4 MiB message cap, > several CHUNK_SIZEs
    swarm.server.publish("big", payload)
    sent_before = swarm.server.bytes_sent
    stats: dict[str, float] = {}
    received = swarm.fetch("big", expected_sha256=sha(payload), stats=stats)
    assert received == payload
    assert stats["bytes_received"] >= len(payload)
    assert stats["seconds"] > 0
    assert swarm.server.bytes_sent - sent_before == stats["bytes_received"]


def test_publish_replaces_and_unpublish_removes(swarm: Swarm) -> None:
    swarm.server.publish("adapter", b"round 1")
    swarm.server.publish("adapter", bytearray(b"round 2"))
    assert swarm.fetch("adapter") == b"round 2"
    assert "adapter" in swarm.server.names()
    swarm.server.unpublish("adapter")
    assert "adapter" not in swarm.server.names()
    with pytest.raises(TransferError, match="unknown blob 'adapter'"):
        swarm.fetch("adapter")


def test_empty_blob_round_trips(swarm: Swarm) -> None:
    swarm.server.publish("empty", b"")
    assert swarm.fetch("empty", expected_sha256=sha(b"")) == b""


def test_expected_sha256_mismatch_is_rejected(swarm: Swarm) -> None:
    swarm.server.publish("weights", b"the real bytes")
    with pytest.raises(TransferError, match="expected"):
        swarm.fetch("weights", expected_sha256=sha(b"other bytes"))


def test_max_size_is_enforced(swarm: Swarm) -> None:
    swarm.server.publish("sized", b"x" * 1000)
    with pytest.raises(TransferError, match="over max_size 999"):
        swarm.fetch("sized", max_size=999)
    assert swarm.fetch("sized", max_size=1000) == b"x" * 1000


def test_unreachable_peer_or_peer_without_server(swarm: Swarm) -> None:
    with pytest.raises(TransferError, match="unreachable"):
        swarm.loop.run(fetch_blob(swarm.client_p2p, UNKNOWN_PEER, "x", timeout=10), timeout=30)
    # The client peer runs no BlobServer at all.
    with pytest.raises(TransferError, match="not serving"):
        swarm.loop.run(
            fetch_blob(swarm.evil_p2p, swarm.client_p2p.peer_id, "x", timeout=10), timeout=30
        )


async def _raw_exchange(swarm: Swarm, request: bytes) -> bytes:
    """Send raw bytes to the real BlobServer and return whatever it answers before closing."""
    _, reader, writer = await swarm.client_p2p.call_binary_stream_handler(
        swarm.server_p2p.peer_id, PROTOCOL
    )
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 1 << 31) + b"x" * 64,  # declares a 2 GiB request
        frame(b"\xff\xfe not json"),
        frame(b"[1, 2, 3]"),
        frame(json.dumps({"name": 7}).encode()),
        frame(json.dumps({"name": ""}).encode()),
        frame(json.dumps({"name": "n" * 10_000}).encode()),  # over the 4 KiB request bound
        b"\x00\x00",  # a partial length prefix, then silence until the server's request timeout
    ],
)
def test_garbage_request_is_closed_and_server_keeps_serving(swarm: Swarm, garbage: bytes) -> None:
    swarm.server.publish("after-garbage", b"still here")
    assert swarm.loop.run(_raw_exchange(swarm, garbage), timeout=30) == b""
    assert swarm.fetch("after-garbage") == b"still here"


# --- malicious or broken servers ----------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> dict:
    length = struct.unpack(">I", await reader.readexactly(4))[0]
    return json.loads(await reader.readexactly(length))


def _evil(swarm: Swarm, reply: bytes, *, stall: float = 0.0) -> list[dict]:
    """Serve `reply` verbatim from the evil peer; record the requests it saw."""
    requests: list[dict] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await _read_request(reader))
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(stall)

    swarm.serve_evil(handler)
    return requests


def test_header_sha_that_does_not_match_data_is_rejected(swarm: Swarm) -> None:
    data = b"poisoned adapter"
    requests = _evil(swarm, header(len(data), sha(b"honest adapter")) + frame(data) + frame(b""))
    with pytest.raises(TransferError, match="sha256 mismatch"):
        swarm.fetch("adapter", peer=swarm.evil_p2p)
    assert requests == [{"name": "adapter"}]


def test_consistent_evil_server_passes_integrity_but_not_expected_sha(swarm: Swarm) -> None:
    data = b"self-consistent but wrong"
    _evil(swarm, header(len(data), sha(data)) + frame(data) + frame(b""))
    assert swarm.fetch("a", peer=swarm.evil_p2p) == data  # the fake server speaks the protocol
    with pytest.raises(TransferError, match="expected"):
        swarm.fetch("a", peer=swarm.evil_p2p, expected_sha256=sha(b"the one we trust"))


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (header(1000, sha(b"a" * 1000)) + frame(b"a" * 500), "truncated"),  # stream just ends
        (header(1000, sha(b"a" * 1000)) + frame(b"a" * 500) + frame(b""), "truncated"),
        (header(10, sha(b"a" * 10)), "truncated"),  # header only
        (header(10, sha(b"a" * 10)) + frame(b"a" * 20), "more than the declared 10"),
        (header(4 * CHUNK_SIZE, "0" * 64) + struct.pack(">I", CHUNK_SIZE + 1), "CHUNK_SIZE"),
        (frame(b"not json"), "malformed header"),
        (frame(json.dumps({"ok": True, "size": -1, "sha256": "0" * 64}).encode()), "bad size"),
        (frame(json.dumps({"ok": True, "size": 1, "sha256": "xyz"}).encode()), "bad sha256"),
        (struct.pack(">I", 1 << 30), "header frame"),  # a 1 GiB header is refused unread
        (b"", "truncated"),  # closes without a word
    ],
)
def test_broken_server_replies_raise_transfer_error(
    swarm: Swarm, reply: bytes, message: str
) -> None:
    _evil(swarm, reply)
    with pytest.raises(TransferError, match=message) as info:
        swarm.fetch("blob", peer=swarm.evil_p2p)
    assert "\n" not in str(info.value)
    assert "blob 'blob'" in str(info.value)


def test_stalling_server_times_out(swarm: Swarm) -> None:
    _evil(swarm, header(10, sha(b"a" * 10)) + frame(b"a" * 5), stall=3)
    stats: dict[str, float] = {}
    with pytest.raises(TransferError, match="timed out after 0.5 s"):
        swarm.fetch("slow", peer=swarm.evil_p2p, timeout=0.5, stats=stats)
    assert 0.4 <= stats["seconds"] < 3


# --- bundles and atomic writes ------------------------------------------------------------


ADAPTER_FILES = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": os.urandom(4096),
    "README.md": b"",
}


def test_pack_unpack_round_trip_keeps_names_bytes_and_order() -> None:
    unpacked = unpack_files(pack_files(ADAPTER_FILES))
    assert unpacked == ADAPTER_FILES
    assert list(unpacked) == list(ADAPTER_FILES)


def _bundle(index: object, body: bytes = b"", magic: bytes = b"STBNDL", version: int = 1) -> bytes:
    raw_index = json.dumps(index).encode()
    return struct.pack(">6sBI", magic, version, len(raw_index)) + raw_index + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"STB", "truncated"),
        (_bundle([], magic=b"NOTBND"), "bad magic"),
        (_bundle([], version=2), "version 2"),
        (pack_files(ADAPTER_FILES)[:-1], "do not add up"),
        (pack_files(ADAPTER_FILES) + b"!", "do not add up"),
        (struct.pack(">6sBI", b"STBNDL", 1, 1000) + b"[]", "truncated inside its index"),
        (_bundle({"a": 1}), "not a list"),
        (_bundle([{"name": "../evil", "size": 0}]), "rejected"),
        (_bundle([{"name": "a/b", "size": 0}]), "rejected"),
        (_bundle([{"name": "a\\b", "size": 0}]), "rejected"),
        (_bundle([{"name": "..", "size": 0}]), "rejected"),
        (_bundle([{"name": "", "size": 0}]), "rejected"),
        (_bundle([{"name": "a", "size": 1}, {"name": "a", "size": 1}], b"xy"), "twice"),
        (_bundle([{"name": "a", "size": -1}]), "bad size"),
        (_bundle([{"name": str(i), "size": 0} for i in range(65)]), "over max_files 64"),
    ],
)
def test_unpack_rejects_bad_bundles(data: bytes, message: str) -> None:
    with pytest.raises(TransferError, match=message):
        unpack_files(data)


def test_pack_refuses_unsafe_names() -> None:
    with pytest.raises(ValueError, match="bad file name"):
        pack_files({"../x": b""})


def test_write_dir_atomically_writes_all_files(tmp_path: Path) -> None:
    out = tmp_path / "round-3" / "adapter"
    write_dir_atomically(ADAPTER_FILES, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ADAPTER_FILES
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no temp dir left over


def test_write_dir_atomically_accepts_an_empty_existing_dir(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    write_dir_atomically({"a": b"1"}, out)
    assert (out / "a").read_bytes() == b"1"


def test_write_dir_atomically_refuses_a_non_empty_dir(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(TransferError, match="not empty"):
        write_dir_atomically({"a": b"1"}, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_write_dir_atomically_leaves_nothing_after_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the first file made it to disk, the second one did not
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    out = tmp_path / "adapter"
    with pytest.raises(OSError, match="No space left"):
        write_dir_atomically(ADAPTER_FILES, out)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_write_dir_atomically_leaves_nothing_if_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_rename(src: object, dst: object) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="I/O error"):
        write_dir_atomically(ADAPTER_FILES, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_write_dir_atomically_refuses_unsafe_names(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="refusing"):
        write_dir_atomically({"../escape": b"x"}, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []
