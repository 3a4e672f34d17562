"""Clustered swarm on real hivemind peers: tasks recovered as clusters, cluster and merged adapters."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import (  # noqa: E402
    Swarm,
    assert_lora_weights_are_the_files,
    load_with_plain_peft,
)

from aggregation.taskvec import adjusted_rand_index  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
CLUSTERED = """run_id: itest-clusters
inner: {steps: 10, batch_size: 8, seq_len: 48}
outer: {name: fedavg}
averaging: {matchmaking_time: 2.0}
clustering: {enabled: true, warmup_rounds: 2, merge_every: 2, merge_method: ties}
"""
TASKS = ["arithmetic", "arithmetic", "capitals", "capitals"]


def test_volunteers_find_their_task_clusters_and_the_merge_is_served(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, config_text=CLUSTERED)
    try:
        swarm.start_coordinator()
        for i, task in enumerate(TASKS):
            swarm.join(f"v{i}", task, 7)
        codes = [swarm.wait(f"v{i}", 300) for i in range(len(TASKS))]
        assert codes == [0] * len(TASKS), "\n".join(swarm.log(f"v{i}") for i in range(4))
        clusters = [json.loads((tmp_path / f"v{i}" / "cluster.json").read_text()) for i in range(4)]
        labels = [c["cluster"] for c in clusters]
        assert adjusted_rand_index(TASKS, labels) == 1.0, labels
        reports = [
            json.loads(x) for x in (tmp_path / "v0" / "metrics.jsonl").read_text().splitlines()
        ]
        assert (
            reports[-1]["outcome"] == "averaged" and reports[-1]["group_size"] == 2
        )  # averaging in its cluster
        assert "clusters v1" in swarm.log("coord") and "into `merged`" in swarm.log("coord")

        listing = swarm.cli("pull", "--initial-peers", swarm.maddr, "--list")
        names = {f"cluster-{c}" for c in labels} | {"merged"}
        assert all(name in listing.stdout for name in names), listing.stdout
        pulled = swarm.cli(
            "pull",
            "--initial-peers",
            swarm.maddr,
            "--adapter",
            "merged",
            "--out",
            str(tmp_path / "m"),
        )
        assert pulled.returncode == 0, pulled.stderr
        assert "ties" in (tmp_path / "m" / "README.md").read_text()
        one = f"cluster-{labels[0]}"
        pulled = swarm.cli(
            "pull", "--initial-peers", swarm.maddr, "--adapter", one, "--out", str(tmp_path / "c")
        )
        assert pulled.returncode == 0 and (tmp_path / "c" / "adapter_model.safetensors").exists()
        assert swarm.cli("export-base", "--out", str(tmp_path / "base")).returncode == 0
        for adapter in (tmp_path / "m", tmp_path / "c"):  # plain PEFT takes both, every key
            model = load_with_plain_peft(tmp_path / "base", adapter)
            assert_lora_weights_are_the_files(model, adapter)
        status = swarm.cli("status", "--initial-peers", swarm.maddr)
        assert "clusters (assignment v" in status.stdout and "cluster" in status.stdout
    finally:
        swarm.close()


def _cluster_of(workdir: Path) -> int | None:
    path = workdir / "cluster.json"
    return json.loads(path.read_text())["cluster"] if path.exists() else None


def _wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_late_volunteer_is_placed_and_clusters_outlive_the_coordinator(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, config_text=CLUSTERED.replace("itest-clusters", "itest-late"))
    try:
        swarm.start_coordinator()
        for i, task in enumerate(TASKS):
            swarm.join(f"v{i}", task, 40)
        _wait_for(
            lambda: all(_cluster_of(tmp_path / f"v{i}") is not None for i in range(4)),
            240,
            "clusters",
        )
        swarm.join("late", "capitals", 40)
        _wait_for(
            lambda: _cluster_of(tmp_path / "late") is not None, 240, "the late volunteer's cluster"
        )
        assert _cluster_of(tmp_path / "late") == _cluster_of(
            tmp_path / "v2"
        )  # the capitals cluster
        swarm.kill("coord", signal.SIGTERM)
        done = len((tmp_path / "v0" / "metrics.jsonl").read_text().splitlines())
        _wait_for(
            lambda: len((tmp_path / "v0" / "metrics.jsonl").read_text().splitlines()) >= done + 2,
            120,
            "rounds after the coordinator left",
        )
        after = [
            json.loads(x) for x in (tmp_path / "v0" / "metrics.jsonl").read_text().splitlines()
        ][done:]
        assert any(r["outcome"] == "averaged" and r["group_size"] == 2 for r in after), after
        for name in ("v0", "v1", "v2", "v3", "late"):
            os.killpg(swarm.procs[name].pid, signal.SIGINT)
        assert [swarm.wait(n, 60) for n in ("v0", "v1", "v2", "v3", "late")] == [0] * 5
        assert not any("Traceback" in swarm.log(n) for n in ("v0", "v1", "v2", "v3", "late"))
    finally:
        swarm.close()
