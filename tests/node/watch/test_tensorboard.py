"""TensorBoard logs, read back with TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swarmtune.node.engine.round import RoundReport
from swarmtune.node.watch.tensorboard import ScalarLog, SwarmLog, round_aggregates, round_scalars


def _read(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {
        tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _report(round_: int, eval_loss: float | None) -> RoundReport:
    return RoundReport(
        round=round_,
        loss_first=2.0,
        loss_mean=1.5,
        loss_last=1.25,
        tokens=100,
        group_size=3,
        outcome="averaged",
        digest="",
        bytes_sent=1000,
        bytes_received=2000,
        inner_s=3.0,
        matchmaking_s=0.5,
        transfer_s=0.25,
        outer_s=0.01,
        wall_s=4.0,
        eval_loss=eval_loss,
        tau=None,
    )


def test_a_volunteer_logs_each_rounds_scalars_at_its_step(tmp_path: Path) -> None:
    log = ScalarLog(tmp_path)
    log.write(1, round_scalars(_report(0, 1.75)))
    log.write(2, round_scalars(_report(1, None)))  # no eval that round: not logged
    log.close()
    scalars = _read(tmp_path / "tensorboard")
    assert scalars["loss/eval"] == [(1, 1.75)]
    assert scalars["loss/inner_mean"] == [(1, 1.5), (2, 1.5)]
    assert scalars["time/utilization"] == [(1, 0.75), (2, 0.75)]
    assert scalars["bytes/received"][0] == (1, 2000.0) and scalars["group/size"][0] == (1, 3.0)
    assert "ghbm/tau" not in scalars  # nesterov: no tau


def _point(peer: str, round_: int, eval_loss: float, cluster: int, traffic: int | None) -> dict:
    return {
        "peer": peer * 10,
        "round": round_,
        "eval_loss": eval_loss,
        "loss": eval_loss + 0.5,
        "cluster": cluster,
        "inner_s": 1.0,
        "wall_s": 4.0 if peer == "a" else 2.0,
        "bytes": traffic,
    }


def test_round_aggregates_are_means_per_cluster_and_sums_of_bytes() -> None:
    points = [_point("a", 3, 1.0, 0, 10), _point("b", 3, 2.0, 0, None), _point("c", 3, 4.0, 1, 5)]
    scalars = round_aggregates(points)
    assert scalars["cluster_eval/cluster-0"] == pytest.approx(1.5)
    assert scalars["cluster_eval/cluster-1"] == pytest.approx(4.0)
    assert scalars["swarm/utilization"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert scalars["swarm/bytes"] == 15 and scalars["swarm/volunteers"] == 3


def test_the_swarm_log_writes_a_rounds_aggregates_once_it_is_two_rounds_old(
    tmp_path: Path,
) -> None:
    swarm = SwarmLog(tmp_path)
    history: list[dict] = []
    for round_ in (1, 2, 3):
        new = [_point("a", round_, 3.0 - round_, -1, 1), _point("b", round_, 1.0, -1, 1)]
        history += new
        swarm.add(new, history)
    assert swarm.written_through == 1  # rounds 2 and 3 may still get late reporters
    swarm.close(history)
    scalars = _read(tmp_path / "tensorboard")
    assert scalars["cluster_eval/run-wide"] == [(1, 1.5), (2, 1.0), (3, 0.5)]
    assert scalars["peer_eval/" + "a" * 8] == [(1, 2.0), (2, 1.0), (3, 0.0)]
