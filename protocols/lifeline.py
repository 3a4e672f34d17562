"""Forked helper processes end with the process that forked them, even after a SIGKILL.

hivemind forks a DHT process (which launches the p2pd daemon) and an averager process per group.
A SIGKILLed parent cannot stop them: they would live on under PID 1 and keep holding the peer
identity, so a restart with the same work dir is refused ("identity ... is already taken").
`install()` gives every child forked afterwards a daemon thread that waits for its parent to
exit (a pidfd, or polling getppid where there is none); it then SIGKILLs the child's own
descendants (p2pd is started by the DHT process, so no fork hook of ours runs in it) and itself.
A thread-bound PR_SET_PDEATHSIG is not used: averagers may be forked by short-lived threads.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from pathlib import Path

POLL_S = 0.5
_installed = False
_forking_pid = 0  # set in the parent right before each fork; the child inherits the value


def install() -> None:
    """Make processes forked from now on (and their descendants) die with their parent."""
    global _installed
    if not _installed:
        os.register_at_fork(before=_remember_parent, after_in_child=_watch_in_background)
        _installed = True


def _remember_parent() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _watch_in_background() -> None:
    parent = _forking_pid
    threading.Thread(target=watch_parent, args=(parent,), name="lifeline", daemon=True).start()


def watch_parent(parent: int) -> None:
    """Block while `parent` is this process's parent; then SIGKILL our subtree and ourselves."""
    pidfd = _open_pidfd(parent)
    try:
        while os.getppid() == parent:
            if pidfd is None:
                time.sleep(POLL_S)
            else:
                select.select([pidfd], [], [], POLL_S)  # readable once the parent has exited
    finally:
        if pidfd is not None:
            os.close(pidfd)
    kill_tree(os.getpid())


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the parent is already gone
        return None


def kill_tree(root: int) -> None:
    """SIGKILL every descendant of `root`, then `root` itself."""
    for pid in [*descendants(root), root]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def descendants(root: int) -> list[int]:
    """PIDs of all processes below `root`, read from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents().items():
        children.setdefault(parent, []).append(pid)
    found: list[int] = []
    queue = [root]
    while queue:
        kids = children.get(queue.pop(), [])
        found.extend(kids)
        queue.extend(kids)
    return found


def parents(proc: Path = Path("/proc")) -> dict[int, int]:
    """Every process's parent pid, pid -> ppid, read from `proc` (empty where there is none)."""
    table: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in proc.iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    # /proc/PID/stat is "PID (COMM) STATE PPID ..."; COMM may contain spaces
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    table[int(entry.name)] = ppid
    return table
