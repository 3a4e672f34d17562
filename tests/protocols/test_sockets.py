"""remove_stale_hivemind_sockets: stale sockets go, live ones and non-sockets stay."""

from __future__ import annotations

import socket
from pathlib import Path

from swarmtune.protocols.sockets import remove_stale_hivemind_sockets


def _stale_socket(path: Path) -> None:
    # Bind, then close without unlinking: exactly what a killed p2pd leaves behind.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def test_removes_stale_sockets_and_keeps_live_ones(tmp_path: Path) -> None:
    live_path = tmp_path / "hivemind-p2pd-live.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(live_path))
    live.listen(1)
    stale_paths = [tmp_path / "hivemind-p2pd-dead.sock", tmp_path / "hivemind-p2pclient-x.sock"]
    for path in stale_paths:
        _stale_socket(path)
    other_stale = tmp_path / "other.sock"  # not hivemind's: not ours to remove
    _stale_socket(other_stale)
    regular_file = tmp_path / "hivemind-notes.sock"
    regular_file.write_text("not a socket")
    try:
        assert remove_stale_hivemind_sockets(tmp_path) == 2
        assert live_path.exists()
        assert not any(path.exists() for path in stale_paths)
        assert other_stale.exists()
        assert regular_file.read_text() == "not a socket"
        # The live socket still works after the sweep.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(live_path))
        assert remove_stale_hivemind_sockets(tmp_path) == 0
    finally:
        live.close()


def test_empty_or_missing_dir_removes_nothing(tmp_path: Path) -> None:
    assert remove_stale_hivemind_sockets(tmp_path) == 0
    assert remove_stale_hivemind_sockets(tmp_path / "absent") == 0
