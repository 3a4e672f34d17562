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


def _cluster_of(workdir: Path) -> int | None:
    path = workdir / "cluster.json"
    return json.loads(path.read_text())["cluster"] if path.exists() else None


def _wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _reports(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_clusters_found_merged_served_joined_late_and_outliving_the_coordinator(
    tmp_path: Path,
) -> None:
    # one swarm for the whole story (a swarm costs about a minute on 2 cores)
    swarm = Swarm(tmp_path, config_text=CLUSTERED)
    try:
        swarm.start_coordinator()
        for i, task in enumerate(TASKS):
            swarm.join(f"v{i}", task, 60)
        _wait_for(
            lambda: all(_cluster_of(tmp_path / f"v{i}") is not None for i in range(4)),
            240,
            "clusters",
        )
        labels = [_cluster_of(tmp_path / f"v{i}") for i in range(4)]
        assert adjusted_rand_index(TASKS, labels) == 1.0, labels
        _wait_for(lambda: "into `merged`" in swarm.log("coord"), 180, "the first merge")
        # the switch from the run-wide group to the clusters cost no round
        _wait_for(lambda: len(_reports(tmp_path / "v0")) >= 6, 120, "rounds in the clusters")
        for i in range(4):
            reports = _reports(tmp_path / f"v{i}")
            assert all(r["outcome"] != "rejected" and not r["excluded"] for r in reports), reports
            assert reports[-1]["outcome"] == "averaged" and reports[-1]["group_size"] == 2

        listing = swarm.cli("pull", "--initial-peers", swarm.maddr, "--list")
        names = {f"cluster-{c}" for c in labels} | {"merged"}
        assert all(name in listing.stdout for name in names), listing.stdout
        pull = ["pull", "--initial-peers", swarm.maddr, "--adapter"]
        pulled = swarm.cli(*pull, "merged", "--out", str(tmp_path / "m"))
        assert pulled.returncode == 0, pulled.stderr
        assert "ties" in (tmp_path / "m" / "README.md").read_text()
        pulled = swarm.cli(*pull, f"cluster-{labels[0]}", "--out", str(tmp_path / "c"))
        assert pulled.returncode == 0 and (tmp_path / "c" / "adapter_model.safetensors").exists()
        assert swarm.cli("export-base", "--out", str(tmp_path / "base")).returncode == 0
        for adapter in (tmp_path / "m", tmp_path / "c"):  # plain PEFT takes both, every key
            model = load_with_plain_peft(tmp_path / "base", adapter)
            assert_lora_weights_are_the_files(model, adapter)
        status = swarm.cli("status", "--initial-peers", swarm.maddr)
        assert "clusters (assignment v" in status.stdout and "cluster" in status.stdout

        swarm.join("late", "capitals", 60)
        _wait_for(lambda: _cluster_of(tmp_path / "late") is not None, 240, "the late cluster")
        assert _cluster_of(tmp_path / "late") == labels[2]  # the capitals cluster
        swarm.kill("coord", signal.SIGTERM)
        done = len(_reports(tmp_path / "v0"))
        _wait_for(lambda: len(_reports(tmp_path / "v0")) >= done + 3, 120, "rounds after")
        after = _reports(tmp_path / "v0")[done:]
        assert any(r["outcome"] == "averaged" and r["group_size"] == 2 for r in after), after
        names = ("v0", "v1", "v2", "v3", "late")
        for name in names:
            os.killpg(swarm.procs[name].pid, signal.SIGINT)
        assert [swarm.wait(n, 60) for n in names] == [0] * 5
        assert not any("Traceback" in swarm.log(n) for n in names)
    finally:
        swarm.close()
