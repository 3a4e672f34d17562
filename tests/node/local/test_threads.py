"""A volunteer's torch threads: its share of the cores among the volunteers on the machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmtune.node.local import threads
from swarmtune.node.local.threads import ThreadShare, is_join, volunteers_here


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/v/bin/python3", "/v/bin/swarmtune", "join", "--data", "builtin:code"], True),
        (["swarmtune", "join"], True),
        (["python", "-m", "swarmtune.cli", "join", "--initial-peers", "X"], True),
        (["python", "-m", "swarmtune.cli", "bootstrap"], False),
        (["/v/bin/swarmtune", "bootstrap", "--workdir", "join"], False),
        (["/v/bin/swarmtune", "-v", "join"], True),
        (["/v/bin/swarmtune", "status"], False),
        (["python", "swarmtune.cli", "join"], False),  # not `-m swarmtune.cli`
        (["vim", "join"], False),
        ([], False),
    ],
)
def test_a_volunteer_is_recognised_by_its_command_line(argv: list[str], expected: bool) -> None:
    assert is_join(argv) is expected


def _process(proc: Path, pid: int, parent: int, *argv: str) -> None:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / str(pid) / "stat").write_text(f"{pid} (py thon) S {parent} 1 1 0 -1")


def test_volunteers_are_counted_from_proc_without_their_forked_helpers(tmp_path: Path) -> None:
    assert volunteers_here(tmp_path) == 1  # none found: this one
    volunteer = ("/v/bin/python3", "/v/bin/swarmtune", "join", "--data", "x")
    _process(tmp_path, 10, 1, *volunteer)
    _process(tmp_path, 20, 10, *volunteer)  # its DHT process (forked: same command line)
    _process(tmp_path, 21, 10, *volunteer)  # its averager
    _process(tmp_path, 11, 1, "python", "-m", "swarmtune.cli", "join")
    _process(tmp_path, 12, 1, "/v/bin/python3", "/v/bin/swarmtune", "bootstrap")
    _process(tmp_path, 13, 12, "bash")
    (tmp_path / "self").mkdir()  # not a pid
    (tmp_path / "14").mkdir()  # a process that ended while we read: no cmdline
    assert volunteers_here(tmp_path) == 2


def test_the_share_follows_the_volunteers_and_a_fixed_count_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.get_num_threads()
    here = {"n": 1}
    monkeypatch.setattr(threads, "volunteers_here", lambda: here["n"])
    monkeypatch.setattr(threads, "cores", lambda: 8)
    try:
        share = ThreadShare(None)
        share.most = 8  # as if torch had chosen 8 threads on 8 cores
        assert share.adjust() == 8 and torch.get_num_threads() == 8
        here["n"] = 3
        assert share.adjust() == 2 and torch.get_num_threads() == 2
        here["n"] = 20
        assert share.adjust() == 1
        here["n"] = 1
        share.most = 4  # never more than torch's own choice
        assert share.adjust() == 4
        fixed = ThreadShare(3)
        here["n"] = 8
        assert fixed.adjust() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
