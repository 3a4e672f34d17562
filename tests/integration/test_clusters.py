"""Clustered swarm on real hivemind peers: tasks recovered as clusters, cluster and merged adapters."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import ArrowConfig, create_arrow_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from swarm_harness import (  # noqa: E402
    Swarm,
    assert_lora_weights_are_the_files,
    load_with_plain_peft,
)

from swarmtune.aggregation.taskvec import adjusted_rand_index  # noqa: E402
from swarmtune.node.local.basemodel import export_base  # noqa: E402

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


def _brief(reports: list[dict]) -> list[tuple]:
    keys = ("round", "outcome", "group_size", "excluded", "problem")
    return [tuple(r.get(k) for k in keys) for r in reports]


def _gathered(report: dict) -> int:
    """How many members the group a round formed had: aggregated or left out (a rejected
    round aggregated nobody, itself included)."""
    return len(set(report["members"]) | set(report["excluded"])) + (report["outcome"] == "rejected")


def _exclusions(log: str) -> list[tuple[int, str]]:
    """(0-based round, reason) of every contribution a volunteer's log says it left out."""
    found = re.findall(r"round (\d+): excluded \S+: (.*)", log)
    return [(int(n) - 1, why) for n, why in found]


def _cold_start(report: dict) -> bool:
    """A round that found no group because hivemind's matchmaking itself failed (not because
    the group had moved on or members held different states)."""
    problem = report.get("problem") or ""
    return report["outcome"] == "no-group" and (
        "MatchmakingException" in problem or "AllreduceException" in problem
    )


def _network(why: str) -> bool:
    """A contribution lost in transfer (its blob did not arrive in time, or a stream broke),
    not one refused for what it was (protocols/transfer.py's TransferError messages)."""
    return any(word in why for word in ("timed out", "unreachable", "unknown blob", "truncated"))


def test_clusters_found_merged_served_joined_late_and_outliving_the_coordinator(
    tmp_path: Path,
) -> None:
    # one swarm for the whole story (starting a swarm costs most of a minute on 2 cores)
    swarm = Swarm(tmp_path, config_text=CLUSTERED)
    try:
        swarm.start_coordinator()
        # --wait-for: the four start round 1 together (one that loaded a second later formed
        # no part of round 1's group on a slow machine, which the switch check below, about
        # the rounds before a volunteer's first cluster round, would take for a switch cost)
        for i, task in enumerate(TASKS):
            swarm.join(f"v{i}", task, 9, "--wait-for", str(len(TASKS)))
        codes = [swarm.wait(f"v{i}", 300) for i in range(len(TASKS))]
        assert codes == [0] * len(TASKS), "\n".join(swarm.log(f"v{i}") for i in range(4))
        labels = [_cluster_of(tmp_path / f"v{i}") for i in range(4)]
        assert adjusted_rand_index(TASKS, labels) == 1.0, labels
        assert "into `merged`" in swarm.log("coord")
        for i in range(4):  # the switch to the clusters: no round lost to waiting or to states
            reports = _reports(tmp_path / f"v{i}")
            reasons = _exclusions(swarm.log(f"v{i}"))
            # its first round in its cluster (by position: a resync repeats round numbers)
            at = next(k for k, r in enumerate(reports) if _gathered(r) == 2)
            before, pair = reports[:at], reports[at : at + 2]
            first = reports[at]["round"]
            brief = (i, _brief(reports[: at + 2]), reasons)
            # every round up to then formed its group: four before the switch, the pair after.
            # Hivemind's first matchmaking under the new cluster's prefix can fail ("could not
            # find a group": counted no-group rounds, README "Clusters"); only right after the
            # switch, and a few at most
            costs = sum(1 for r in before if _cold_start(r))
            assert costs <= 3 and all(_cold_start(r) for r in before[len(before) - costs :]), brief
            assert [_gathered(r) for r in before[: len(before) - costs]] == [4] * (at - costs), (
                brief
            )
            assert [_gathered(r) for r in pair] == [2, 2], brief
            # nobody was left out for holding another state (the switch is synchronised); a
            # fetch that a loaded machine lost is counted like in any other round, not a cost
            # of the switch
            assert not any(round_ < first + 2 and not _network(why) for round_, why in reasons), (
                brief
            )
            # averaging in its cluster (a partner that started a round later may have finished
            # its fixed number of rounds before this one's last round)
            in_cluster = [r for r in reports[-3:] if r["outcome"] == "averaged"]
            assert in_cluster and all(r["group_size"] == 2 for r in in_cluster), reports[-3:]

        # with the volunteers gone the coordinator serves the adapters on a quiet machine
        pull = ("pull", "--initial-peers", swarm.maddr)
        status, merged, cluster, library, listed = swarm.cli_many(
            ("status", "--initial-peers", swarm.maddr),
            (*pull, "--adapter", "merged", "--out", str(tmp_path / "m")),
            (*pull, "--adapter", f"cluster-{labels[0]}", "--out", str(tmp_path / "c")),
            (*pull, "--adapter", "library", "--out", str(tmp_path / "lib")),
            (*pull, "--list"),
        )
        assert "clusters (assignment v" in status.stdout
        assert "pull --adapter library" in listed.stdout, listed.stdout
        names = {f"cluster-{c}" for c in labels} | {"merged"}
        assert all(name in status.stdout for name in names), status.stdout  # its offers table
        assert merged.returncode == 0, merged.stderr
        assert "ties" in (tmp_path / "m" / "README.md").read_text()
        assert cluster.returncode == 0 and (tmp_path / "c" / "adapter_model.safetensors").exists()
        # the library holds every cluster's adapter, each the bytes a single pull of it gives
        assert library.returncode == 0, library.stderr
        listing = json.loads((tmp_path / "lib" / "library.json").read_text())
        assert sorted(e["dir"] for e in listing["adapters"]) == sorted(
            f"cluster-{c}" for c in set(labels)
        )
        single = (tmp_path / "c" / "adapter_model.safetensors").read_bytes()
        same = tmp_path / "lib" / f"cluster-{labels[0]}" / "adapter_model.safetensors"
        assert same.read_bytes() == single, library.stdout

        # the capitals cluster comes back (restarted from its work dirs) and a newcomer joins it;
        # they start up while the pulled adapters are checked
        for i in (2, 3):
            swarm.join(f"v{i}", TASKS[i], 60)
        swarm.join("late", "capitals", 60)
        base = export_base(tmp_path / "base")
        for adapter in (tmp_path / "m", tmp_path / "c"):  # plain PEFT takes both, every key
            model = load_with_plain_peft(base, adapter)
            assert_lora_weights_are_the_files(model, adapter)
        experts = [str(tmp_path / "lib" / e["dir"]) for e in listing["adapters"]]
        routed = create_arrow_model(
            AutoModelForCausalLM.from_pretrained(base), experts, ArrowConfig(top_k=2)
        )
        with torch.no_grad():
            assert torch.isfinite(routed(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
        _wait_for(lambda: _cluster_of(tmp_path / "late") is not None, 240, "the late cluster")
        assert _cluster_of(tmp_path / "late") == labels[2]
        swarm.kill("coord", signal.SIGTERM)
        before = len(_reports(tmp_path / "v2"))
        _wait_for(lambda: len(_reports(tmp_path / "v2")) >= before + 3, 120, "rounds after")
        after = _reports(tmp_path / "v2")[before:]
        assert any(r["outcome"] == "averaged" and r["group_size"] >= 2 for r in after), after
        names = ("v2", "v3", "late")
        for name in names:
            os.killpg(swarm.procs[name].pid, signal.SIGINT)
        assert [swarm.wait(n, 60) for n in names] == [0] * 3
        logs = {n: swarm.log(n) for n in ("v0", "v1", "v2", "v3", "late")}
        traced = {n: text for n, text in logs.items() if "Traceback" in text}
        assert not traced, traced
    finally:
        swarm.close()
