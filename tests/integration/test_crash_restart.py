"""SIGKILL of a peer's main process: its helper processes die with it, a restart resumes at once.

hivemind forks a DHT process (which starts p2pd) and an averager process; torch starts
torch_shm_manager. Left running, they keep the peer identity and the restart is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # installed with peft
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import ROOT, Swarm  # noqa: E402

from swarmtune.node.engine.checkpoint import Checkpoint  # noqa: E402
from swarmtune.node.engine.state import decode_state  # noqa: E402

INNER_STEPS = 10  # swarm_harness.FAST_CONFIG
GONE_WITHIN_S = 15.0  # torch_shm_manager exits 2 s after its last client hung up


def _rounds_done(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_rounds(swarm: Swarm, name: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _rounds_done(swarm.tmp / name) < n:
        assert swarm.procs[name].poll() is None, swarm.log(name)
        assert time.monotonic() < deadline, f"{name} did not reach {n} rounds:\n{swarm.log(name)}"
        time.sleep(0.3)


def _helpers(pid: int) -> list[psutil.Process]:
    """Every process below `pid`, with what they are (names checked below)."""
    return psutil.Process(pid).children(recursive=True)


def _alive(proc: psutil.Process) -> bool:
    try:  # is_running compares the start time too, so a recycled pid does not count
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _sigkill_main_only(swarm: Swarm, name: str) -> list[psutil.Process]:
    """SIGKILL one peer's main process (not its group); its helpers that outlive GONE_WITHIN_S."""
    proc = swarm.procs[name]
    helpers = _helpers(proc.pid)
    names = sorted(p.name() for p in helpers)
    assert "p2pd" in names and len(names) >= 3, names  # DHT + p2pd + averager (+ shm manager)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + GONE_WITHIN_S
    while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in helpers if _alive(p)]


FORKING_PARENT = """
import os, subprocess, time
from swarmtune.protocols import lifeline
lifeline.install()
if os.fork() == 0:  # like hivemind's DHT process, which then starts p2pd
    sleeper = subprocess.Popen(["sleep", "120"])
    print(os.getpid(), sleeper.pid, flush=True)
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


def test_forked_child_and_its_subprocess_die_with_a_sigkilled_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKING_PARENT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child, sleeper = (psutil.Process(int(pid)) for pid in parent.stdout.readline().split())
        time.sleep(1.0)  # longer than the watcher's poll: it must not fire while the parent lives
        assert _alive(child) and _alive(sleeper)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (_alive(child) or _alive(sleeper)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child) and not _alive(sleeper)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # its own session: only what this test started


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkilled_peers_leave_no_process_and_resume_at_once_with_their_identity(
    tmp_path: Path,
) -> None:
    swarm = Swarm(tmp_path, run_id="itest-crash")
    survivors: list[psutil.Process] = []
    try:
        first = swarm.start_coordinator()
        # v0 is `python -m cli` as a user starts it (not forked from the test zygote): its
        # helper processes must die with that process
        swarm.join("v0", "arithmetic", 1000, forked=False)
        # v1 and v2 go on while v0 is dead, so v0 must catch up (a group of two can vouch for
        # its states; a lone survivor's rounds could not be proven to v0). --wait-for 3: they
        # wait for v0's start-up (its own imports, 15-30 s on 2 cores) instead of training
        # beside it and slowing it down
        swarm.join("v1", "dates", 1000, "--wait-for", "3")
        swarm.join("v2", "code", 1000, "--wait-for", "3")
        _wait_rounds(swarm, "v0", 1, 120)
        survivors = _sigkill_main_only(swarm, "v0")
        assert not survivors, [(p.pid, p.name()) for p in survivors]

        # what the killed process had saved at its last completed round
        workdir = tmp_path / "v0"
        state = decode_state((workdir / "state.safetensors").read_bytes())
        local = torch.load(workdir / "local.pt", weights_only=True)
        assert state.round >= 1 and local["round"] <= state.round
        if local["round"] != state.round:
            # killed between the two renames (a resync right after a round saves too): the
            # stale local file must then be ignored on load, the group state kept
            shapes = {name: value.shape for name, value in state.params.items()}
            loaded = Checkpoint(workdir).load(shapes)
            assert loaded is not None and loaded[0].digest() == state.digest() and loaded[1] is None
        _wait_rounds(swarm, "v1", state.round + 1, 120)

        log_before = len(swarm.log("v0"))
        swarm.join("v0", "arithmetic", 1)  # same work dir, same identity, right away
        assert swarm.wait("v0", 120) == 0, swarm.log("v0")
        log = swarm.log("v0")[log_before:]
        assert f"resumed from checkpoint at round {state.round}" in log, log
        assert "already taken" not in log
        assert "synced to the group's state at round" in log, log  # v1 went on meanwhile
        after = torch.load(workdir / "local.pt", weights_only=True)
        assert after["round"] > state.round + 1  # one round from v1's newer state
        # AdamW moments and the data stream went on from the checkpoint, not from scratch
        saved_steps = {i: int(s["step"]) for i, s in local["local"]["optimizer"]["state"].items()}
        steps = {i: int(s["step"]) for i, s in after["local"]["optimizer"]["state"].items()}
        if local["round"] == state.round:
            assert steps == {i: n + INNER_STEPS for i, n in saved_steps.items()}
            drawn = local["local"]["batches"]["batches_drawn"]
            assert after["local"]["batches"]["batches_drawn"] == drawn + INNER_STEPS
        else:  # the stale local file was ignored (checked above): moments start afresh
            assert steps == dict.fromkeys(saved_steps, INNER_STEPS)
        report = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
        assert report["resyncs"] >= 1
        if report["round"] != after["round"] - 1:
            # v1 and v2 went on during that round: at the end v0 adopted their newer state
            # (Peer.finish), which is saved without a round report of its own
            assert report["round"] < after["round"] - 1, (report["round"], after["round"])
            assert f"synced to the group's state at round {after['round']}" in log, log

        survivors = _sigkill_main_only(swarm, "coord")
        assert not survivors, [(p.pid, p.name()) for p in survivors]

        # the coordinator comes back with the same peer id, so printed join lines stay valid
        (tmp_path / "addr.txt").unlink()
        log_before = len(swarm.log("coord"))
        second = swarm.start_coordinator()
        peer_id = first.rsplit("/p2p/", 1)[1]
        assert "/p2p/" in first and second.rsplit("/p2p/", 1)[1] == peer_id
        # the join lines are printed just after the address file is written: give them time
        deadline = time.monotonic() + 30
        while "--initial-peers" not in swarm.log("coord")[log_before:]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        log = swarm.log("coord")[log_before:]
        assert "--initial-peers" in log and peer_id in log and "already taken" not in log, log
    finally:
        _kill(survivors)
        swarm.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_overlapped_volunteer_sigkilled_mid_run_resumes_and_agrees_with_its_group(
    tmp_path: Path,
) -> None:
    # overlapped rounds (averaging.overlap): an exchange is in flight while the next compute
    # runs, so a kill lands mid-pipeline; the restart resumes from the last concluded round,
    # catches up, and ends on the same states as the member that went on
    swarm = Swarm(tmp_path, run_id="itest-crash-overlap")
    survivors: list[psutil.Process] = []
    try:
        swarm.start_coordinator()
        swarm.join("v0", "arithmetic", 1000, "--overlap", "on")
        swarm.join("v1", "dates", 1000, "--overlap", "on")
        swarm.join("v2", "code", 1000, "--overlap", "on")  # v1 and v2 vouch for their rounds
        _wait_rounds(swarm, "v0", 2, 120)
        survivors = _sigkill_main_only(swarm, "v0")
        assert not survivors, [(p.pid, p.name()) for p in survivors]
        saved = decode_state((tmp_path / "v0" / "state.safetensors").read_bytes()).round
        assert saved >= 2
        _wait_rounds(swarm, "v1", saved + 1, 120)

        before = len(swarm.log("v0"))
        swarm.join("v0", "arithmetic", 1000, "--overlap", "on")

        def reports() -> list[dict]:
            path = tmp_path / "v0" / "metrics.jsonl"
            return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

        # it goes on until it averaged again with the group (on a busy machine its first
        # overlapped rounds after the restart can miss the others' groups), then Ctrl+C
        deadline = time.monotonic() + 180
        while not any(r["round"] > saved and r["outcome"] == "averaged" for r in reports()):
            assert swarm.procs["v0"].poll() is None, swarm.log("v0")
            assert time.monotonic() < deadline, (reports(), swarm.log("v0"))
            time.sleep(0.3)
        swarm.kill("v0", signal.SIGINT)
        assert swarm.wait("v0", 60) == 0, swarm.log("v0")
        log = swarm.log("v0")[before:]
        assert f"resumed from checkpoint at round {saved}" in log, log
        assert "synced to the group's state at round" in log, log  # v1 went on meanwhile
        after = [r for r in reports() if r["round"] > saved]
        assert after and all(r["overlapped"] for r in after)
        averaged = [r for r in after if r["outcome"] == "averaged"]
        assert averaged, after
        # every round v0 averaged after its restart ended on the state of every member it
        # averaged with (its members, itself included; under churn a round may split, as when
        # one member's matchmaking fails: it is then counted as a fallback by that member)
        last = max(r["round"] for r in averaged)
        theirs = {}
        for name in ("v1", "v2"):
            _wait_rounds(swarm, name, last + 1, 60)
            path = tmp_path / name / "metrics.jsonl"
            theirs[name] = {
                r["round"]: r["digest"] for r in map(json.loads, path.read_text().splitlines())
            }
        for r in averaged:
            same = [n for n in theirs if theirs[n].get(r["round"]) == r["digest"]]
            assert len(same) >= len(r["members"]) - 1 >= 1, (r, theirs)
    finally:
        _kill(survivors)
        swarm.close()
