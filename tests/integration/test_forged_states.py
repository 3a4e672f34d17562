"""A stranger who only announces (docs/design.md, 8. Trust, "States carry proof"): real peers
on 127.0.0.1, with two bench/forger.py strangers announcing every honest round's state negated,
three rounds ahead, with their own round certificates, and offering their adapters as `global`
at round 1,000,000 (one serves its forgeries, the other serves nothing).

Before round certificates every honest volunteer adopted the forged states (highest round won)
and `pull` served the forged adapter; here neither happens, and the announcements cost the
honest volunteers no round."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import ROOT, Swarm  # noqa: E402

from swarmtune.node.adapters.adapter import adapter_digest  # noqa: E402
from swarmtune.node.engine.state import decode_state  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
ROUNDS = 5


def _reports(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _forger(swarm: Swarm, name: str, *extra: str) -> None:
    args = ["--initial-peers", swarm.maddr, "--run", "itest-run", "--seconds", "300"]
    args += ["--out", str(swarm.tmp / f"{name}.jsonl"), *extra]
    swarm.run_script(name, ROOT / "bench" / "forger.py", *args, "--workdir", str(swarm.tmp / name))


def test_forged_states_and_offers_take_nothing(tmp_path: Path) -> None:
    # two strangers at once: one serves its forgeries, the other only announces them
    swarm = Swarm(tmp_path)
    forgers = ("served", "unserved")
    outputs: list[str] = []
    try:
        swarm.start_coordinator()
        _forger(swarm, "served")
        _forger(swarm, "unserved", "--no-serve")
        # the volunteers start once both strangers are in the swarm (they would otherwise
        # finish their 5 rounds before a stranger's DHT start-up is done)
        deadline = time.monotonic() + 120
        for name in forgers:
            out = tmp_path / f"{name}.jsonl"
            while not (out.exists() and '"ready"' in out.read_text()):
                assert swarm.procs[name].poll() is None, swarm.log(name)
                assert time.monotonic() < deadline, swarm.log(name)
                time.sleep(0.2)
        for name, task in (("v0", "arithmetic"), ("v1", "dates")):
            swarm.join(name, task, ROUNDS, "--wait-for", "2")
        for name in ("v0", "v1"):
            assert swarm.wait(name, 300) == 0, swarm.log(name)
        time.sleep(1.0)  # the forgers announce a forgery of the volunteers' last state too
        pulled = swarm.cli(
            "pull", "--initial-peers", swarm.maddr, "--out", str(tmp_path / "adapter")
        )
    finally:
        for name in forgers:
            if name in swarm.procs and swarm.procs[name].poll() is None:
                os.killpg(swarm.procs[name].pid, signal.SIGTERM)
        for name in forgers:
            if name in swarm.procs:
                swarm.procs[name].wait(timeout=30)
                outputs.append(swarm.log(name))
        swarm.close()
    for output in outputs:  # each announced forgeries ahead of the honest rounds
        forged = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
        rounds = {f["forged_round"] for f in forged if "forged_round" in f}
        assert rounds & set(range(ROUNDS + 1, ROUNDS + 4)), output[-2000:]

    states = [decode_state((tmp_path / v / "state.safetensors").read_bytes()) for v in ("v0", "v1")]
    assert {s.round for s in states} == {ROUNDS} and len({s.digest() for s in states}) == 1
    for name in ("v0", "v1"):
        reports = _reports(tmp_path / name)
        # every round followed the last, from the group's own state: nothing adopted, no round
        # lost to a "moved on" cancellation, no group missed
        assert [r["round"] for r in reports] == list(range(ROUNDS)), swarm.log(name)
        assert reports[-1]["resyncs"] == 0 and reports[-1]["fallbacks"] == 0, swarm.log(name)
        assert all(r["outcome"] == "averaged" for r in reports), swarm.log(name)
    assert "round 1000000 mirrored" not in swarm.log("coord")

    assert pulled.returncode == 0, pulled.stderr
    assert f"round {ROUNDS}," in pulled.stdout and "verified: round certificate" in pulled.stdout
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter_digest(tensors) == adapter_digest(states[0].params)
