"""Volunteers behind separate NATs train with a public coordinator (tests/integration/netns.py).

What this exercises: the dial-back probe finding both homes unreachable, relay mode (circuit
relay for matchmaking, blobs passed on by the relay), through the coordinator for one home and
through a public volunteer (`--serve-relay`) for the other, a SIGKILLed NATed volunteer
restarting behind the other and fetching its state through the coordinator, `status` and a
consumer inside a NAT pulling an adapter. The segments are private ranges, so libp2p's own AutoNAT and hole punching
stay out of it (docs/design.md, 10. Across the internet).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netns import PUBLIC, Homes  # noqa: E402
from swarm_harness import Swarm  # noqa: E402

pytestmark = pytest.mark.slow
RELAY_PORT = 47200  # v3's fixed port on the public segment (inside the test's namespaces)


@pytest.fixture(scope="module")
def homes() -> object:
    built = Homes()
    why = built.up()
    if why is not None:
        pytest.skip(why)
    try:
        yield built
    finally:
        built.down()


def _metrics(workdir: Path) -> dict[int, dict[str, object]]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {int(r["round"]): r for r in rows}


def _wait_line(swarm: Swarm, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in swarm.log(name):
        assert swarm.procs[name].poll() is None, swarm.log(name)
        assert time.monotonic() < deadline, f"{name}: no {text!r}:\n{swarm.log(name)}"
        time.sleep(0.3)


def _wait(swarm: Swarm, name: str, rounds: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while max(_metrics(swarm.tmp / name), default=0) < rounds:
        assert swarm.procs[name].poll() is None, swarm.log(name)
        assert time.monotonic() < deadline, f"{name}: no round {rounds}:\n{swarm.log(name)}"
        time.sleep(0.3)


def _together(swarm: Swarm, ids: dict[str, str], after: int) -> list[int]:
    """Rounds past `after` that v1 and v2 averaged in one group: each names the other among
    its round's members (with three volunteers, groups of two form too)."""
    ours, theirs = _metrics(swarm.tmp / "v1"), _metrics(swarm.tmp / "v2")
    return [
        r
        for r in ours
        if r > after
        and r in theirs
        and ids["v2"] in ours[r]["members"]  # type: ignore[operator]
        and ids["v1"] in theirs[r]["members"]  # type: ignore[operator]
    ]


def _wait_together(swarm: Swarm, ids: dict[str, str], after: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while not (rounds := _together(swarm, ids, after)):
        for name in ("v1", "v2"):
            assert swarm.procs[name].poll() is None, swarm.log(name)
        assert time.monotonic() < deadline, f"v1 and v2 never averaged together past {after}"
        time.sleep(0.3)
    return rounds


def _mirrored(log: str, at_least: int) -> bool:
    """Whether the coordinator's log says it mirrored the global adapter of a round >= that."""
    found = re.findall(r"adapter global round (\d+) mirrored", log)
    return any(int(n) >= at_least for n in found)


def test_two_nated_volunteers_train_restart_and_a_nated_consumer_pulls(
    homes: Homes, tmp_path: Path
) -> None:
    swarm = Swarm(tmp_path, run_id="nat-run")
    try:
        swarm.start_coordinator("--host", "0.0.0.0", netns=homes.pub)
        addrs = (tmp_path / "addr.txt").read_text().split()
        towards = {i: next(a for a in addrs if f"/{PUBLIC[i]}/" in a) for i in (1, 2)}
        joined = ("--host", "0.0.0.0")  # listening everywhere does not make a home dialable
        names = ("v1", "v2", "v3")
        made = swarm.cli_many(*(("id", "--workdir", str(tmp_path / v)) for v in names))
        ids = {v: done.stdout.strip() for v, done in zip(names, made, strict=True)}
        # v3: a volunteer on the public segment that also relays; v2 joins through it, v1
        # through the coordinator (it starts up beside v3)
        v3 = f"/ip4/{PUBLIC[2]}/tcp/{RELAY_PORT}/p2p/{ids['v3']}"
        swarm.maddr = towards[2]
        swarm.join("v3", "code", 1000, *joined, "--port", str(RELAY_PORT), "--serve-relay",
                   netns=homes.pub)  # fmt: skip
        swarm.maddr = towards[1]
        swarm.join("v1", "dates", 1000, *joined, netns=homes.home(1))
        _wait_line(swarm, "v3", "joined run", timeout=60)
        swarm.maddr = v3
        swarm.join("v2", "arithmetic", 1000, *joined, netns=homes.home(2))
        _wait(swarm, "v1", 2, timeout=120)

        # each home found out it cannot be dialed, and said so first; v3 can be
        for name, relay in (("v1", towards[1]), ("v2", v3)):
            first = swarm.log(name).splitlines()[0]
            assert f"reachability: relay through {relay}" in first, swarm.log(name)
            assert "could not dial" in first, first
        first = swarm.log("v3").splitlines()[0]
        assert "reachability: direct" in first and "relays for volunteers" in first, first
        # the two homes averaged together, through the coordinator, and agreed
        _wait_together(swarm, ids, -1, timeout=120)
        os.killpg(swarm.procs["v1"].pid, signal.SIGKILL)  # its helpers go with its group
        swarm.procs["v1"].wait(timeout=30)
        before = _metrics(tmp_path / "v1")
        averaged = _together(swarm, ids, -1)
        theirs = _metrics(tmp_path / "v2")
        assert all(before[r]["digest"] == theirs[r]["digest"] for r in averaged)

        # v2 goes on without v1, so the restarted v1 must fetch a newer state, which only the
        # coordinator can pass on to it (v1 is behind NAT)
        _wait(swarm, "v2", max(before) + 1, timeout=90)
        swarm.maddr = towards[1]
        swarm.join("v1", "dates", 1000, *joined, netns=homes.home(1))
        # after the restart they average together again, through the coordinator, and agree
        together = _wait_together(swarm, ids, max(before), timeout=180)
        swarm.kill("v1", signal.SIGINT)
        assert swarm.wait("v1", timeout=60) == 0, swarm.log("v1")
        done = max(before) + 1  # metrics count rounds from 0, the log and checkpoints from 1
        assert f"resumed from checkpoint at round {done}" in swarm.log("v1")
        assert "synced to the group's state" in swarm.log("v1"), swarm.log("v1")
        ours, theirs = _metrics(tmp_path / "v1"), _metrics(tmp_path / "v2")
        assert all(ours[r]["digest"] == theirs[r]["digest"] for r in together)
        last = max(_metrics(tmp_path / "v1"))
        # the coordinator mirrors the adapter of that round (or a newer one) before the
        # volunteers leave: the consumer below pulls it from the coordinator alone
        deadline = time.monotonic() + 60
        while not _mirrored(swarm.log("coord"), last + 1):
            assert time.monotonic() < deadline, swarm.log("coord")
            time.sleep(0.3)
        swarm.kill("v2", signal.SIGINT)  # Ctrl+C: it leaves cleanly
        assert swarm.wait("v2", timeout=60) == 0, swarm.log("v2")
        swarm.kill("v3", signal.SIGINT)
        assert swarm.wait("v3", timeout=60) == 0, swarm.log("v3")

        # a consumer at home asks for the status and pulls (both at once)
        out = tmp_path / "pulled"
        swarm.spawn("status", "status", "--initial-peers", towards[2], netns=homes.home(2))
        swarm.spawn("pull", "pull", "--initial-peers", towards[2], "--out", str(out),
                    netns=homes.home(2))  # fmt: skip
        assert swarm.wait("status", timeout=60) == 0, swarm.log("status")
        shown = [line.split() for line in swarm.log("status").splitlines() if "volunteer" in line]
        assert sorted(row[2] for row in shown) == ["direct", "relay", "relay"], swarm.log("status")
        assert swarm.wait("pull", timeout=120) == 0, swarm.log("pull")
        assert (out / "adapter_model.safetensors").stat().st_size > 0
        served = re.search(r"round (\d+)", (out / "README.md").read_text())
        assert served and int(served.group(1)) >= last + 1, (out / "README.md").read_text()
    finally:
        swarm.close()
        deadline = time.monotonic() + 20  # helpers of a killed peer end within seconds
        while homes.pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in homes.pids()}
        assert not leftover, f"processes left in the test's namespaces: {leftover}"
