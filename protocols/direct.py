"""Bulk blob bytes over a plain TCP connection, beside the libp2p stream (docs/design.md, 6).

Every byte through p2pd crosses two unix sockets, Noise encryption and yamux framing: on
loopback a p2p stream moves 200-350 MB/s where a TCP socket moves 2-3 GB/s (bench/transfer.py).
For large blobs between peers that can dial each other, the blob protocol hands the bytes to
a direct connection instead; what makes them trustworthy stays on the authenticated stream:

    client -> server (p2p stream):  {"name": str, "direct": true}
    server -> client (p2p stream):  {"ok": true, "size": N, "sha256": hex,
                                     "direct": {"port": P, "token": 64 hex}}
    client -> server (TCP, the host the client's libp2p connection reaches, port P): the
                                     token's 32 bytes
    server -> client (TCP):          exactly N bytes, then the server closes

The size and sha256 come from the peer itself over its authenticated stream, and a group
member's sha256 was committed before the reveal: bytes that do not hash to it are refused,
whoever altered them on the way. The client then asks again over the p2p stream; a direct
failure is the network's, never counted against the peer. A token is random, serves one
connection, names one snapshot of the bytes and expires after TOKEN_TTL seconds. The TCP
bytes are not encrypted: turn this on where contributions need no secrecy from the network
path (they are shared with the group anyway), e.g. a LAN or one data center.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import socket
import threading
import time
from typing import Any

import numpy

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
TOKEN_TTL = 30.0
MAX_TOKENS = 64  # tickets outstanding at once; beyond that a request is streamed as before
MAX_CONNECTIONS = 16  # connections served at once; more are closed at once
DIRECT_MIN = 1 << 20  # smaller blobs go over the p2p stream: one round trip saved is worth more
CONNECT_TIMEOUT = 2.0  # connecting, and a client presenting its token
IDLE_TIMEOUT = 5.0  # the longest pause between two pieces of a transfer
MIN_SEND_RATE = 1 << 20  # bytes/s: a sender gives up on a receiver slower than this
_RECV = 1 << 20


class DirectError(RuntimeError):
    """A direct transfer failed (one line); the caller falls back to the p2p stream."""


class DirectServer:
    """Listens on (host, any port) and sends each token's bytes to the one connection that
    presents it; a thread accepts, one short-lived thread per connection sends. Anyone may
    connect, so what a stranger can hold is bounded: MAX_CONNECTIONS threads, each for at most
    CONNECT_TIMEOUT without a valid token; MAX_TOKENS tickets, each for TOKEN_TTL."""

    def __init__(self, host: str) -> None:
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.5)  # the accept loop notices close() within this
        self.port = int(self._sock.getsockname()[1])
        self._tokens: dict[bytes, tuple[bytes, float]] = {}  # in order of expiry
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = threading.Event()
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._accept, name="direct-blobs", daemon=True)
        self._thread.start()

    def offer(self, data: bytes) -> dict[str, Any] | None:
        """A one-use ticket for `data` (the header's "direct" field), or None while
        MAX_TOKENS are outstanding (the bytes then go over the stream)."""
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        with self._lock:
            while self._tokens and next(iter(self._tokens.values()))[1] <= now:
                del self._tokens[next(iter(self._tokens))]  # the oldest expire first
            if self._closed.is_set() or len(self._tokens) >= MAX_TOKENS:
                return None
            self._tokens[token] = (data, now + TOKEN_TTL)
        return {"port": self.port, "token": token.hex()}

    def close(self) -> None:
        """Stop accepting and forget the tickets; transfers in flight end on their own."""
        self._closed.set()
        self._sock.close()
        with self._lock:
            self._tokens.clear()
        self._thread.join(timeout=2)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            if not self._slots.acquire(blocking=False):
                conn.close()  # busy: the client falls back to the stream
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, keep accepting
                conn.close()
                self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(CONNECT_TIMEOUT)
                token = _recv_exactly(conn, TOKEN_BYTES, time.monotonic() + CONNECT_TIMEOUT)
                with self._lock:
                    entry = self._tokens.pop(token, None)
                if entry is None or entry[1] < time.monotonic():
                    return  # unknown, used or expired: close without a byte
                data = entry[0]
                conn.settimeout(IDLE_TIMEOUT + len(data) / MIN_SEND_RATE)
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                with self._lock:
                    self.bytes_sent += len(data)
        except OSError as exc:
            log.debug("direct transfer failed: %s", exc)
        finally:
            self._slots.release()


def parse_offer(raw: Any) -> tuple[int, bytes] | None:
    """(port, token) from a header's "direct" field, or None when it is malformed."""
    if not isinstance(raw, dict):
        return None
    port, token = raw.get("port"), raw.get("token")
    # a ticket names a port on the peer's own address; a privileged one is never ours
    if type(port) is not int or not 1024 <= port < 65536 or not isinstance(token, str):
        return None
    try:
        token_bytes = bytes.fromhex(token)
    except ValueError:
        return None
    return (port, token_bytes) if len(token_bytes) == TOKEN_BYTES else None


def fetch_direct(
    host: str, port: int, token: bytes, size: int, sha256: str, timeout: float
) -> bytes:
    """The `size` bytes behind `token` at host:port, hashing to `sha256`; else DirectError.
    Blocking (run it in an executor). It receives into one buffer while a second thread hashes
    what has landed, so the check costs little beyond the transfer itself (sha256 and the
    socket both release the GIL)."""
    deadline = time.monotonic() + timeout
    buffer = numpy.empty(size, numpy.uint8)  # not zero-filled first, unlike a bytearray
    view = memoryview(buffer.data).cast("B")
    digest = hashlib.sha256()
    landed: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # ends of received ranges

    def hash_landed() -> None:
        start = 0
        while (end := landed.get()) is not None:
            digest.update(view[start:end])
            start = end

    hasher = threading.Thread(target=hash_landed, name="direct-sha256", daemon=True)
    hasher.start()
    try:
        _receive(host, port, token, view, deadline, landed)
    finally:
        landed.put(None)
        hasher.join()
    if digest.hexdigest() != sha256:
        raise DirectError("bytes do not hash to the sha256 the peer declared")
    return buffer.tobytes()


def _receive(
    host: str,
    port: int,
    token: bytes,
    view: memoryview,
    deadline: float,
    landed: queue.SimpleQueue[int | None],
) -> None:
    """Fill `view` from the connection, telling `landed` every _RECV bytes (and at the end).
    A pause of IDLE_TIMEOUT (or the deadline) ends it: a silent peer is a failure to fall back
    from, not a wait until the caller's own timeout."""
    size, got, told = len(view), 0, 0

    def pause() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DirectError(f"timed out after {got} of {size} bytes")
        return min(IDLE_TIMEOUT, left)

    try:
        with socket.create_connection((host, port), timeout=min(CONNECT_TIMEOUT, pause())) as conn:
            conn.sendall(token)
            while got < size:
                conn.settimeout(pause())
                n = conn.recv_into(view[got:], size - got)
                if n == 0:
                    raise DirectError(f"connection closed after {got} of {size} bytes")
                got += n
                if got - told >= _RECV or got == size:
                    landed.put(got)
                    told = got
            conn.settimeout(pause())
            if conn.recv(1):
                raise DirectError(f"more than the declared {size} bytes")
    except OSError as exc:  # TimeoutError included
        raise DirectError(f"{host}:{port}: {type(exc).__name__}: {exc}"[:200]) from None


def dial_host(addrs: list[Any]) -> str | None:
    """The IPv4 host of a peer's first direct TCP multiaddr (not through a relay), or None."""
    for addr in addrs:
        parts = str(addr).split("/")
        if "p2p-circuit" in parts or len(parts) < 5:
            continue
        if parts[1] == "ip4" and parts[3] == "tcp":
            return parts[2]
    return None


def _recv_exactly(conn: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("token not presented in time")
        conn.settimeout(left)
        piece = conn.recv(n - len(data))
        if not piece:
            raise ConnectionError("closed early")
        data += piece
    return data
