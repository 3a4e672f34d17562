"""The latency forwarder of the emulated networks (delayproxy.py) delays and keeps every byte."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ONE_WAY_MS = 100


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_every_byte_arrives_in_order_and_no_sooner_than_the_delay() -> None:
    server, port = _echo_server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen_port = probe.getsockname()[1]
    proxy = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("delayproxy.py")), "127.0.0.1",
         str(listen_port), "127.0.0.1", str(port), str(ONE_WAY_MS)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        payload = os.urandom(3 << 20)  # many reads' worth, each delayed on its own
        with socket.create_connection(("127.0.0.1", listen_port), timeout=30) as conn:
            started = time.monotonic()
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
            # a lower bound only: through the forwarder and back cannot be faster than 2 delays
            assert time.monotonic() - started >= 2 * ONE_WAY_MS / 1e3
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            received = bytearray()
            while len(received) < len(payload):
                received += conn.recv(1 << 16)
            sender.join()
        assert bytes(received) == payload
    finally:
        proxy.kill()
        proxy.wait()
        server.close()
