"""Streamed, chunked, sha256-checked blob transfer over libp2p binary streams.

hivemind caps one RPC message at 4 MiB; a raw binary stream through p2pd has no cap, but we
still send bounded chunks so neither side ever trusts a peer-declared length it did not bound.

Wire format (every frame is a 4-byte big-endian length, then that many bytes):
    client -> server: request frame, JSON {"name": str}                (<= MAX_CONTROL_FRAME)
    server -> client: header frame, JSON {"ok": true, "size": N, "sha256": hex}
                                      or {"ok": false, "error": str}   (<= MAX_CONTROL_FRAME)
                      then data frames of 1..CHUNK_SIZE bytes, then one zero-length frame;
    the client closes the stream first (the server waits for that, bounded, then closes).
A name `via/PEER/NAME` asks a relay for PEER's blob NAME (BlobServer's `proxy`): the relay
asks PEER over PEER's own connection and passes the answer on frame by frame (pass_on_blob).
A request with `"direct": true` may be answered with a header that carries a direct TCP
ticket instead of data frames (protocols/direct.py); a server without one streams as always.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from swarmtune.protocols.direct import (
    DIRECT_MIN,
    DirectServer,
    dial_host,
    fetch_direct,
    parse_offer,
)

logger = logging.getLogger(__name__)

PROTOCOL = "swarmtune.blob.v1"
VIA = "via/"  # `via/PEER/NAME`: NAME from PEER, passed on by a relay (BlobServer's proxy)
MAX_PASSED_ON = 1 << 30  # the largest blob a relay passes on
CHUNK_SIZE = 1 << 20
MAX_CONTROL_FRAME = 4096
DIRECT_TIMEOUT = 60.0  # a direct transfer's own bound (fetch_blob's timeout bounds the whole)
MAX_NAME_LEN = 256
_LEN = struct.Struct(">I")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_BUNDLE_MAGIC = b"STBNDL"
_BUNDLE_VERSION = 1
_BUNDLE_HEAD = struct.Struct(">6sBI")  # magic, version, index length


class TransferError(RuntimeError):
    """A blob could not be fetched, unpacked or written; the message is one clear line."""


class StreamEndedEarly(TransferError):
    """The stream closed before the whole blob arrived (a reset: worth a fresh stream)."""


UNKNOWN_BLOB = "unknown blob"  # a server's refusal of a name it does not serve, then the name


def unknown_blob(name: str) -> str:
    """The refusal a server sends for a blob `name` it does not serve (fetch_many tells a
    member's own refusal of its contribution's name by it)."""
    return f"{UNKNOWN_BLOB} {name!r}"


class NotServed(TransferError):
    """The peer answered, but does not serve the blob (still "unknown blob" when the wait for
    it ended): for a group member that committed to it, withholding."""


class OtherBlob(TransferError):
    """The peer serves the blob under another sha256 than the one we expect (which whoever
    relayed the expectation, such as a group's leader, may have altered)."""


def _one_line(text: object, limit: int = 200) -> str:
    # Peer-supplied text ends up in our logs and errors: keep it short and on one line.
    return " ".join(str(text).split())[:limit]


async def write_frame(writer: asyncio.StreamWriter, payload: bytes | memoryview) -> int:
    writer.write(_LEN.pack(len(payload)))
    if payload:
        writer.write(payload)
    await writer.drain()  # backpressure: never buffer more than one chunk per stream
    return _LEN.size + len(payload)


async def read_frame(reader: asyncio.StreamReader, limit: int, what: str) -> bytes:
    length = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
    if length > limit:
        raise TransferError(f"{what} frame of {length} bytes exceeds the {limit}-byte limit")
    return await reader.readexactly(length)


class BlobServer:
    """Serves published byte blobs by name to peers that call PROTOCOL."""

    def __init__(
        self,
        p2p: P2P,
        *,
        request_timeout: float = 10.0,
        proxy: Callable[[str, str, asyncio.StreamWriter], Awaitable[int]] | None = None,
    ) -> None:
        """`proxy(peer, name, writer)`, if given, answers `via/PEER/NAME` requests with another
        peer's blob and returns the bytes it wrote (a relay passing on a relayed peer's blobs,
        protocols/reach.py; see pass_on_blob)."""
        self._p2p = p2p
        self._proxy = proxy
        self._request_timeout = request_timeout
        self._blobs: dict[str, tuple[bytes, str]] = {}
        self._lock = threading.Lock()  # publish() is called from the training thread
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self.bytes_sent = 0
        self.direct: DirectServer | None = None  # hands large blobs to a direct TCP connection

    async def start(self) -> None:
        """Register the stream handler with the p2p daemon."""
        if not self._started:
            await self._p2p.add_binary_stream_handler(PROTOCOL, self._handle)
            self._started = True

    async def stop(self) -> None:
        """Unregister the handler and cancel transfers in flight."""
        if self._started:
            self._started = False
            try:
                await self._p2p.remove_binary_stream_handler(PROTOCOL)
            except (P2PDaemonError, OSError) as e:  # the daemon may already be gone
                logger.debug("removing %s handler failed: %s", PROTOCOL, e)
        for task in list(self._tasks):
            task.cancel()

    def publish(self, name: str, data: bytes) -> None:
        """Serve `data` under `name`, replacing earlier bytes; thread-safe."""
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise ValueError(f"blob name must be a non-empty str of <= {MAX_NAME_LEN} chars")
        data = bytes(data)  # a no-op for bytes; freezes a bytearray the caller might mutate
        entry = (data, hashlib.sha256(data).hexdigest())
        with self._lock:
            self._blobs[name] = entry

    def enable_direct(self, server: DirectServer) -> None:
        """Hand large blobs to direct TCP connections through `server` from now on."""
        self.direct = server

    def unpublish(self, name: str) -> None:
        """Stop serving `name`; a no-op if it is not published."""
        with self._lock:
            self._blobs.pop(name, None)

    def get(self, name: str) -> bytes | None:
        """The bytes served under `name`, or None."""
        with self._lock:
            entry = self._blobs.get(name)
        return entry[0] if entry is not None else None

    def names(self) -> list[str]:
        """Names currently published, sorted."""
        with self._lock:
            return sorted(self._blobs)

    async def _handle(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request = await asyncio.wait_for(self._read_request(reader), self._request_timeout)
            if request is None:
                logger.debug("malformed blob request from %s; closing stream", info.peer_id)
                return
            await self._send(*request, writer)
            # p2pd can drop what it still buffers when our end of the stream closes first
            # (seen as clients' truncated reads on loopback): the client closes once it has it all
            await asyncio.wait_for(reader.read(1), self._request_timeout)
        except Exception as e:  # a misbehaving or vanished peer must never take the server down
            logger.debug("blob stream from %s failed: %s", info.peer_id, _one_line(repr(e)))
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, bool] | None:
        """(name, whether a direct TCP ticket may answer it), or None when malformed."""
        try:
            request = json.loads(await read_frame(reader, MAX_CONTROL_FRAME, "request"))
        except (TransferError, ValueError):  # JSONDecodeError and UnicodeDecodeError included
            return None
        name = request.get("name") if isinstance(request, dict) else None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            return None
        return name, request.get("direct") is True

    async def _send(self, name: str, direct: bool, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            entry = self._blobs.get(name)
        if entry is None and self._proxy is not None and name.startswith(VIA):
            peer, _, rest = name[len(VIA) :].partition("/")
            self.bytes_sent += await self._proxy(peer, rest, writer)
            return
        if entry is None:
            self.bytes_sent += await refuse(writer, unknown_blob(name))
            return
        data, sha256 = entry
        header: dict[str, Any] = {"ok": True, "size": len(data), "sha256": sha256}
        ticket = (
            self.direct.offer(data) if direct and self.direct and len(data) >= DIRECT_MIN else None
        )
        if ticket is not None:  # the bytes go over that connection, not this stream
            header["direct"] = ticket
        self.bytes_sent += await write_frame(writer, json.dumps(header).encode())
        if ticket is not None:
            return
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK_SIZE):
            self.bytes_sent += await write_frame(writer, view[offset : offset + CHUNK_SIZE])
        self.bytes_sent += await write_frame(writer, b"")


async def refuse(writer: asyncio.StreamWriter, error: str) -> int:
    """Answer a blob request with an error header; the bytes written."""
    header = {"ok": False, "error": _one_line(error, 300)}
    return await write_frame(writer, json.dumps(header).encode())


async def pass_on_blob(
    p2p: P2P, peer_id: PeerID, name: str, writer: asyncio.StreamWriter, max_size: int
) -> int:
    """Answer a request on `writer` with blob `name` fetched from `peer_id`, chunk by chunk as
    it arrives (a relay holds one chunk, not the blob). The header, with the peer's size and
    sha256, goes first; the asking side checks the sha256 at the end as always. A refusal is
    passed on as one, so that "unknown blob" stays recognisable; a transfer that breaks
    midway leaves the asking side a truncated stream (StreamEndedEarly there). Returns the
    bytes written."""
    try:
        _, reader, upstream = await p2p.call_binary_stream_handler(peer_id, PROTOCOL)
    except (P2PDaemonError, OSError) as e:
        return await refuse(writer, f"{peer_id} unreachable from the relay: {_one_line(e)}")
    written = 0
    try:
        await write_frame(upstream, json.dumps({"name": name}).encode())
        try:
            size, sha256 = _parse_header(await read_frame(reader, MAX_CONTROL_FRAME, "header"))
        except TransferError as e:
            return await refuse(writer, str(e))
        if size > max_size:
            return await refuse(writer, f"blob is {size} bytes, over the relay's {max_size}")
        header = {"ok": True, "size": size, "sha256": sha256}
        written += await write_frame(writer, json.dumps(header).encode())
        left = size
        while True:
            chunk = await read_frame(reader, CHUNK_SIZE, "data")
            if not chunk:
                break
            left -= len(chunk)
            if left < 0:
                raise TransferError(f"{peer_id} sent more than its declared {size} bytes")
            written += await write_frame(writer, chunk)
        if left == 0:
            written += await write_frame(writer, b"")
        return written  # short of the size: no end frame, the asking side sees a truncation
    finally:
        upstream.close()


async def fetch_blob(
    p2p: P2P,
    peer_id: PeerID,
    name: str,
    *,
    expected_sha256: str | None = None,
    max_size: int = 1 << 30,
    timeout: float = 60.0,
    stats: dict[str, float] | None = None,
    direct: bool = False,
) -> bytes:
    """Fetch blob `name` from `peer_id`, verified against size and sha256; else TransferError.

    `stats`, if given, is filled with bytes_received (wire bytes) and seconds, even on failure,
    and `direct`: 1 when the bytes came over a direct connection, -1 when one failed.
    `direct`: ask for a direct TCP ticket (protocols/direct.py) when our connection to the peer
    is a direct TCP one; any failure there asks again over the p2p stream.
    """
    counter = {"bytes": 0, "direct": 0}
    started = time.perf_counter()
    where = f"fetch of blob {_one_line(repr(name), 80)} from {peer_id}"
    try:
        fetch = _fetch(p2p, peer_id, name, expected_sha256, max_size, counter, direct, timeout)
        return await asyncio.wait_for(fetch, timeout)
    except asyncio.TimeoutError:
        raise TransferError(f"{where}: timed out after {timeout:g} s") from None
    except TransferError as e:
        raise type(e)(f"{where}: {e}") from None  # the kind survives the added context
    finally:
        if stats is not None:
            stats["bytes_received"] = counter["bytes"]
            stats["direct"] = counter["direct"]
            stats["seconds"] = time.perf_counter() - started


async def _fetch(
    p2p: P2P,
    peer_id: PeerID,
    name: str,
    expected_sha256: str | None,
    max_size: int,
    counter: dict[str, int],
    direct: bool = False,
    timeout: float = DIRECT_TIMEOUT,
) -> bytes:
    # One request per fresh stream; fetch_blob prefixes every TransferError with its context.
    started = time.monotonic()
    direct_host = await _direct_host(p2p, peer_id) if direct else None
    try:
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, PROTOCOL)
    except (P2PDaemonError, OSError) as e:
        raise TransferError(f"peer unreachable or not serving {PROTOCOL}: {_one_line(e)}") from None
    offer = None
    try:
        request: dict[str, Any] = {"name": name, **({"direct": True} if direct_host else {})}
        await write_frame(writer, json.dumps(request).encode())
        raw_header = await read_frame(reader, MAX_CONTROL_FRAME, "header")
        counter["bytes"] += _LEN.size + len(raw_header)
        size, sha256 = _parse_header(raw_header)
        if size > max_size:
            raise TransferError(f"blob is {size} bytes, over max_size {max_size}")
        if expected_sha256 is not None and sha256 != expected_sha256.lower():
            raise OtherBlob(f"peer offers sha256 {sha256}, expected {expected_sha256}")
        ticket = json.loads(raw_header).get("direct") if direct_host else None  # (valid JSON)
        if ticket is None:
            return await _read_payload(reader, size, sha256, counter)
        offer = parse_offer(ticket)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise StreamEndedEarly(f"stream ended early (truncated): {_one_line(repr(e))}") from None
    finally:
        writer.close()
    if offer is not None and direct_host is not None:
        counter["direct"] = -1  # until it succeeds: a cancelled attempt counts as a failure too
        # at most half of what is left, so that the stream still has time after a failure
        budget = min(DIRECT_TIMEOUT, (timeout - (time.monotonic() - started)) / 2)
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, fetch_direct, direct_host, *offer, size, sha256, budget
            )
            counter["bytes"] += size
            counter["direct"] = 1
            return data
        except Exception as e:  # noqa: BLE001 - whatever broke there, the stream is the fallback
            logger.info("direct transfer from %s failed (%s); using the p2p stream", peer_id, e)
    # a malformed ticket or a failed direct transfer: the same blob over the p2p stream
    return await _fetch(p2p, peer_id, name, expected_sha256, max_size, counter)


async def _direct_host(p2p: P2P, peer_id: PeerID) -> str | None:
    """The IPv4 host our libp2p connection to `peer_id` reaches, when it is a direct TCP one."""
    try:
        peers = await p2p.list_peers()
    except (P2PDaemonError, OSError):
        return None
    return next((dial_host(p.addrs) for p in peers if p.peer_id == peer_id), None)


def _parse_header(raw: bytes) -> tuple[int, str]:
    try:
        header = json.loads(raw)
    except ValueError:
        raise TransferError("malformed header: not JSON") from None
    if not isinstance(header, dict):
        raise TransferError("malformed header: not an object")
    if header.get("ok") is not True:
        raise TransferError(f"peer refused: {_one_line(header.get('error'))}")
    size, sha256 = header.get("size"), header.get("sha256")
    if type(size) is not int or size < 0:  # bool is an int subclass, hence no isinstance
        raise TransferError(f"malformed header: bad size {_one_line(size, 40)}")
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        raise TransferError("malformed header: bad sha256")
    return size, sha256


async def _read_payload(
    reader: asyncio.StreamReader, size: int, sha256: str, counter: dict[str, int]
) -> bytes:
    chunks: list[bytes] = []
    received = 0
    digest = hashlib.sha256()
    while True:
        length = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
        counter["bytes"] += _LEN.size
        if length == 0:
            break
        if length > CHUNK_SIZE:
            raise TransferError(f"chunk of {length} bytes exceeds CHUNK_SIZE {CHUNK_SIZE}")
        if received + length > size:
            raise TransferError(f"peer sent more than the declared {size} bytes")
        chunk = await reader.readexactly(length)
        counter["bytes"] += length
        digest.update(chunk)
        chunks.append(chunk)
        received += length
    if received != size:
        raise TransferError(f"truncated: got {received} of {size} declared bytes")
    if digest.hexdigest() != sha256:
        raise TransferError(f"sha256 mismatch: data hashes to {digest.hexdigest()}, not {sha256}")
    return b"".join(chunks)


def _bad_name_reason(name: object) -> str | None:
    # Bundle names become file names inside an adapter dir: nothing may escape that dir.
    if not isinstance(name, str) or not name:
        return "empty or not a string"
    if "/" in name or "\\" in name or ".." in name or "\x00" in name or name == ".":
        return "contains a path separator, '..', '.' or NUL"
    return None


def pack_files(files: Mapping[str, bytes]) -> bytes:
    """Bundle named files: magic, version, index length, JSON index [{name, size}], contents."""
    for name in files:
        reason = _bad_name_reason(name)
        if reason is not None:
            raise ValueError(f"bad file name {name!r}: {reason}")
    index = json.dumps([{"name": n, "size": len(d)} for n, d in files.items()]).encode()
    head = _BUNDLE_HEAD.pack(_BUNDLE_MAGIC, _BUNDLE_VERSION, len(index))
    return b"".join([head, index, *(bytes(d) for d in files.values())])


def unpack_files(data: bytes, *, max_files: int = 64) -> dict[str, bytes]:
    """Inverse of pack_files; raises TransferError on any malformed or unsafe bundle."""
    if len(data) < _BUNDLE_HEAD.size:
        raise TransferError(f"bundle truncated: {len(data)} bytes is shorter than its header")
    magic, version, index_len = _BUNDLE_HEAD.unpack_from(data)
    if magic != _BUNDLE_MAGIC:
        raise TransferError("not a swarmtune bundle: bad magic bytes")
    if version != _BUNDLE_VERSION:
        raise TransferError(f"unsupported bundle version {version}")
    body_start = _BUNDLE_HEAD.size + index_len
    if body_start > len(data):
        raise TransferError("bundle truncated inside its index")
    entries = _parse_index(data[_BUNDLE_HEAD.size : body_start], max_files)
    if sum(size for _, size in entries) != len(data) - body_start:
        raise TransferError("bundle sizes do not add up to its length")
    files: dict[str, bytes] = {}
    offset = body_start
    for name, size in entries:
        files[name] = bytes(data[offset : offset + size])
        offset += size
    return files


def _parse_index(raw: bytes, max_files: int) -> list[tuple[str, int]]:
    try:
        index = json.loads(raw)
    except ValueError:
        raise TransferError("bundle index is not JSON") from None
    if not isinstance(index, list):
        raise TransferError("bundle index is not a list")
    if len(index) > max_files:
        raise TransferError(f"bundle has {len(index)} files, over max_files {max_files}")
    entries: list[tuple[str, int]] = []
    for item in index:
        if not isinstance(item, dict) or set(item) != {"name", "size"}:
            raise TransferError("bundle index entry is not {name, size}")
        name, size = item["name"], item["size"]
        reason = _bad_name_reason(name)
        if reason is not None:
            raise TransferError(f"bundle file name {_one_line(repr(name), 80)} rejected: {reason}")
        if type(size) is not int or size < 0:
            raise TransferError(f"bundle file {name!r} has a bad size")
        if any(name == seen for seen, _ in entries):
            raise TransferError(f"bundle names {name!r} twice")
        entries.append((name, size))
    return entries


def write_dir_atomically(files: Mapping[str, bytes], out_dir: Path) -> None:
    """Write `files` into a fresh `out_dir` all at once, or leave nothing there."""
    out_dir = Path(out_dir)
    for name in files:
        reason = _bad_name_reason(name)
        if reason is not None:
            raise TransferError(f"refusing to write file {name!r}: {reason}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TransferError(f"refusing to write into {out_dir}: it exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    renamed = False
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it 0o700; the result is an ordinary dir
        for name, data in files.items():
            write_synced(tmp_dir / name, data)
        fsync_dir(tmp_dir)
        _rename_into_place(tmp_dir, out_dir)
        renamed = True
        fsync_dir(out_dir.parent)  # makes the rename itself durable
    except BaseException:
        shutil.rmtree(out_dir if renamed else tmp_dir, ignore_errors=True)
        raise


def _rename_into_place(tmp_dir: Path, out_dir: Path) -> None:
    try:
        os.rename(tmp_dir, out_dir)  # atomic; replaces out_dir only if it is an empty dir
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise TransferError(
                f"refusing to write into {out_dir}: it appeared meanwhile"
            ) from None
        raise


def write_synced(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, flushed to disk before returning."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
