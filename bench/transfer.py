"""Benchmark: how fast a contribution moves between two peers on loopback, layer by layer.

Run:  .venv/bin/python bench/transfer.py [--sizes 10 50] [--repeats 3] [--write]

Rows, each the best of --repeats, for blobs of --sizes MB:
- raw TCP: one socket on 127.0.0.1, a thread sending, a thread receiving (the ceiling);
- p2p stream: hivemind's libp2p daemon stream between two processes' peers, bytes written
  straight to it (what any protocol over p2pd can reach);
- blob fetch: swarmtune's blob protocol over that stream (framing, chunking, sha256), at each
  chunk size in --chunks KB;
- blob fetch, direct TCP: the same request, its bytes over a plain TCP connection beside the
  stream (averaging.direct_tcp, protocols/direct.py), sha256 checked as they land.
Both peers live in this process (two SwarmNodes, each with its own p2pd); the measured path
crosses both daemons, as between two machines.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hivemind.p2p import PeerID  # noqa: E402
from results_md import replace_section  # noqa: E402

from swarmtune.protocols import transfer  # noqa: E402
from swarmtune.protocols.swarm import SwarmNode  # noqa: E402

RAW_PROTOCOL = "swarmtune.bench.raw"


def raw_tcp(size: int) -> float:
    """Seconds to push `size` bytes through one loopback TCP connection."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    payload = memoryview(os.urandom(1 << 20))
    done = threading.Event()

    def receive() -> None:
        conn, _ = server.accept()
        buffer, got = bytearray(1 << 20), 0
        while got < size:
            n = conn.recv_into(buffer)
            if not n:
                break
            got += n
        conn.close()
        done.set()

    thread = threading.Thread(target=receive)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    sent = 0
    while sent < size:
        chunk = payload[: min(len(payload), size - sent)]
        client.sendall(chunk)
        sent += len(chunk)
    done.wait()
    seconds = time.perf_counter() - started
    client.close()
    thread.join()
    server.close()
    return seconds


def p2p_stream(sender: SwarmNode, receiver: SwarmNode, size: int) -> float:
    """Seconds to stream `size` raw bytes from `sender` to `receiver` through both daemons."""
    finished: dict[str, float] = {}

    async def handle(_info, reader, writer) -> None:  # noqa: ANN001
        got = 0
        while got < size:
            data = await reader.read(1 << 20)
            if not data:
                break
            got += len(data)
        finished["at"] = time.perf_counter()
        writer.close()

    async def push() -> float:
        await receiver.p2p.add_binary_stream_handler(RAW_PROTOCOL, handle)
        _, _, writer = await sender.p2p.call_binary_stream_handler(
            PeerID.from_base58(receiver.peer_id), RAW_PROTOCOL
        )
        payload = os.urandom(1 << 20)
        started = time.perf_counter()
        sent = 0
        while sent < size:
            writer.write(payload[: min(len(payload), size - sent)])
            sent += min(len(payload), size - sent)
            await writer.drain()
        while "at" not in finished:
            await __import__("asyncio").sleep(0.001)
        writer.close()
        await receiver.p2p.remove_binary_stream_handler(RAW_PROTOCOL)
        return finished["at"] - started

    return sender.loop.run(push(), timeout=300)


def blob_fetch(server: SwarmNode, client: SwarmNode, size: int, chunk: int) -> float:
    """Seconds for `client` to fetch a `size`-byte blob from `server` with this chunk size
    (over a direct connection when both have enable_direct()ed: checked)."""
    data = os.urandom(size)
    server.blobs.publish("bench", data)
    sha = hashlib.sha256(data).hexdigest()
    transfer.CHUNK_SIZE = chunk  # both ends run in this process: one module, one setting
    stats: dict[str, float] = {}
    started = time.perf_counter()
    got = client.routes.fetch(
        server.peer_id, "bench", expected_sha256=sha, timeout=300, stats=stats
    )
    seconds = time.perf_counter() - started
    assert got == data and stats["direct"] == (1 if client.routes.direct else 0), stats
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50], help="MB")
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 1024, 4096], help="KB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    server = SwarmNode(initial_peers=[], host="127.0.0.1")
    client = SwarmNode(initial_peers=server.maddrs(), host="127.0.0.1")
    default_chunk = transfer.CHUNK_SIZE
    rows = ["| path | " + " | ".join(f"{mb} MB" for mb in args.sizes) + " |"]
    rows.append("|---|" + "---|" * len(args.sizes))

    def row(name: str, measure) -> None:  # noqa: ANN001
        cells = []
        for mb in args.sizes:
            best = min(measure(mb << 20) for _ in range(args.repeats))
            cells.append(f"{mb / best:.0f} MB/s")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)

    try:
        row("raw TCP socket, 127.0.0.1", raw_tcp)
        row("p2p stream through both p2pd", lambda n: p2p_stream(client, server, n))
        for kb in args.chunks:
            mark = " (the default)" if kb << 10 == default_chunk else ""
            row(
                f"blob fetch, {kb} KB chunks{mark}",
                lambda n, c=kb << 10: blob_fetch(server, client, n, c),
            )
        transfer.CHUNK_SIZE = default_chunk
        server.enable_direct()
        client.enable_direct()
        row("blob fetch, direct TCP", lambda n: blob_fetch(server, client, n, default_chunk))
    finally:
        transfer.CHUNK_SIZE = default_chunk
        client.shutdown()
        server.shutdown()
    text = "\n".join(
        [
            "## Transfer throughput",
            "",
            f"`python bench/transfer.py --sizes {' '.join(map(str, args.sizes))} --repeats"
            f" {args.repeats} --write` ({platform.machine()}, {os.cpu_count()} cores, loopback;"
            " best of the repeats; 1 MB = 2^20 bytes):",
            "",
            *rows,
        ]
    )
    if args.write:
        replace_section("transfer", text)
        print("wrote the transfer section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
