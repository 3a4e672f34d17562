"""Torch threads of a volunteer that shares its machine with other volunteers.

torch starts one OpenMP thread per core, and an OpenMP thread that waits at a barrier spins
before it sleeps. Two volunteers with 2 threads each on 2 cores then spin against each other:
bench/threads.py measured 10.6-10.9 s for 20 inner steps each, against 1.4 s alone and 1.7-1.9 s
for two volunteers with 1 thread each. So unless `--threads` fixes the number, a volunteer
takes its share of the cores, cores // (volunteers running on this machine), at start and again
after every round, as others start and stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from swarmtune.protocols.lifeline import parents

log = logging.getLogger("swarmtune.threads")


def is_join(argv: list[str]) -> bool:
    """True for the command line of a volunteer: `swarmtune join ...` or `python -m swarmtune.cli join`."""
    for i, arg in enumerate(argv):
        program = Path(arg).name == "swarmtune" or (
            arg == "swarmtune.cli" and argv[i - 1 : i] == ["-m"]
        )
        if program:  # its subcommand is the first argument that is not an option
            return next((a for a in argv[i + 1 :] if not a.startswith("-")), "") == "join"
    return False


def volunteers_here(proc: Path = Path("/proc")) -> int:
    """How many volunteers run on this machine (this one included; at least 1). A volunteer's
    forked helpers (hivemind's DHT and averager processes) carry its command line too: only
    processes whose parent is not a volunteer count."""
    joins: dict[int, int] = {}  # pid -> parent pid
    for pid, parent in parents(proc).items():
        with contextlib.suppress(OSError):
            argv = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace")
            if is_join([a for a in argv.split("\0") if a]):
                joins[pid] = parent
    return max(sum(parent not in joins for parent in joins.values()), 1)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ThreadShare:
    """Keeps torch's thread count at this volunteer's share of the cores, unless fixed."""

    def __init__(self, fixed: int | None) -> None:
        self.fixed = fixed
        self.most = torch.get_num_threads()  # torch's own choice: never more than that
        if fixed:
            torch.set_num_threads(fixed)

    def adjust(self) -> int:
        """Set (and return) the thread count for the next round; logs a change."""
        if self.fixed:
            return self.fixed
        volunteers, available = volunteers_here(), cores()
        share = max(1, min(self.most, available // volunteers))
        if share != torch.get_num_threads():
            torch.set_num_threads(share)
            log.info(
                "torch threads: %d (%d volunteers on this machine's %d cores; --threads N fixes it)",
                share,
                volunteers,
                available,
            )
        return share
