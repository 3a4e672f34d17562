"""Clean up unix sockets left behind by p2pd daemons that died without unlinking them.

hivemind names its sockets /tmp/hivemind-p2pd-*.sock and /tmp/hivemind-p2pclient-*.sock;
a killed node leaves them behind, and on a shared machine they pile up. A socket that still
accepts connections belongs to a live process (maybe a colleague's) and is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

_PATTERN = "hivemind-*.sock"


def _is_stale(path: Path) -> bool:
    """True if connecting to the unix socket at `path` is refused, i.e. nobody listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:  # timeout, permission, full backlog: someone may be there, keep it
            return False
    return False


def remove_stale_hivemind_sockets(tmp_dir: str | Path = "/tmp") -> int:
    """Remove hivemind-*.sock sockets in `tmp_dir` that refuse connections; return how many."""
    removed = 0
    for path in sorted(Path(tmp_dir).glob(_PATTERN)):
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):  # never delete a regular file by mistake
                continue
        except FileNotFoundError:
            continue
        if not _is_stale(path):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            path.unlink()
            removed += 1
            logger.debug("removed stale socket %s", path)
    return removed
